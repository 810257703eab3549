"""Shared by the command-line tests: a tiny training run's flags, an output path that
cannot be created, and the ``flatmin`` command run as a real process (optionally with an
installed package hidden)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

TINY = ["--dataset", "digits", "--model", "mlp", "--subset", "64", "--batch-size", "32"]


def train_tiny(tmp_path: Path, *args: str, out: str = "run") -> int:
    """``flatmin train`` in-process on the tiny digits set, into ``tmp_path/out``."""
    from flatmin.cli import main

    return main(["train", *TINY, "--out", str(tmp_path / out), *args])


def uncreatable(tmp_path: Path) -> str:
    """A path under which no directory can be made: sysfs refuses even root, and a
    read-only directory refuses anyone else."""
    if os.geteuid() == 0:
        return "/sys/flatmin-test-out"
    (tmp_path / "ro").mkdir(mode=0o500)
    return str(tmp_path / "ro" / "out")


# Runs `flatmin ARGS...` with the modules named in HIDDEN made unimportable, as on a
# machine where the optional extra that provides them was not installed.
_WITHOUT = """
import importlib.abc, sys
hidden = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
from flatmin.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def flatmin(
    args: Sequence[str], *, hidden: Sequence[str] = (), timeout: float = 300
) -> subprocess.CompletedProcess:
    """``flatmin ARGS`` in a new process, with the top-level packages ``hidden`` missing."""
    command = [sys.executable, "-c", _WITHOUT, ",".join(hidden) or "-", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
