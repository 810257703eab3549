"""Files written whole or not at all: a temporary file beside the target, then a rename.

``atomic_write(path, write)`` calls ``write(file)`` on a new temporary file in ``path``'s
folder, flushes it to disk and moves it onto ``path`` with :func:`os.replace`, which is
atomic on POSIX and Windows: a reader (or a run killed at any instant) sees the previous
complete file or the new one, never a torn one. The file gets the permissions a plain
``open(path, "w")`` would give it (``0o666`` less the umask), so a run directory shared
with others stays readable by them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:  # O_EXCL: a name no other writer holds; mode 0o666: the umask applies
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)  # fmt: skip
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
