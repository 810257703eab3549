"""An exclusive lock on a run directory, held for as long as a run writes into it.

The lock is ``fcntl.flock`` on the file ``DIR/.lock``: the kernel releases it when the
holder's process ends, however it ends (a killed run never leaves a stale lock), and two
processes cannot both hold it. The file is removed on release; a process that locked a
file someone else removed in the meantime sees that the path no longer names its file
and tries again, so the lock is never held twice.

    with RunLock(out):          # RunLocked (a ValueError) if another process holds it
        ...                     # train, write files

POSIX only (``fcntl``); on other systems the lock is not taken and runs are not
protected from each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

LOCK_NAME = ".lock"


class RunLocked(ValueError):
    """The run directory is locked by another process."""


class RunLock:
    """A non-blocking exclusive lock on ``directory`` (created if needed)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if no other process holds it; ``False`` if one does."""
        if self._fd is not None:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return True
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return True
            os.close(fd)  # the holder removed the file as we opened it: lock the new one

    def release(self) -> None:
        """Remove the lock file and release the lock (a no-op if not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        if not self.acquire():
            raise RunLocked(
                f"{self.directory} is in use by another flatmin process (it holds "
                f"{self.path}); wait for it to finish or choose another --out"
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
