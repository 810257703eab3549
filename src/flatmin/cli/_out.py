"""The one check of every command's output path, made before the command does any work.

    check_out(Path("runs/x"))                    # a directory the command writes into
    check_out(Path("fig/runs.png"), kind="file")  # a file it writes (its folder is made)

A path that cannot be used raises ``ValueError`` with one line naming the flag, the path
and what is wrong (a file where a directory is wanted or the other way round, a folder
that cannot be created, one that is not writable); each command prints it as its
``flatmin COMMAND: error:`` line and exits with status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal


def check_out(path: Path, *, kind: Literal["directory", "file"] = "directory",
              flag: str = "--out") -> None:  # fmt: skip
    """Refuse ``path`` as a ``kind`` the command writes if it cannot be one.

    Whether a missing folder can be created is found out by creating it (permissions,
    read-only and special file systems cannot all be told in advance); the folders made
    to find out are removed again, so a command refused later leaves nothing behind.
    """
    path = Path(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    folder = path if kind == "directory" else path.parent
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be created: {error.strerror}") from None
    try:
        writable = os.access(folder, os.W_OK | os.X_OK) and (
            kind == "directory" or not path.exists() or os.access(path, os.W_OK)
        )
    finally:
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:  # something was put there meanwhile: keep it
                break
    if not writable:
        raise ValueError(f"{flag} {path} is not writable")
