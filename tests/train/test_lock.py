"""The run directory's lock (flatmin.train.lock), across real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flatmin.train.lock import LOCK_NAME, RunLock, RunLocked

HOLD = """
import sys, time
from flatmin.train.lock import RunLock
lock = RunLock(sys.argv[1])
assert lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_lock_is_exclusive_and_leaves_no_file(tmp_path):
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    assert first.acquire()
    assert not second.acquire()
    with pytest.raises(RunLocked, match=r"is in use by another flatmin process"):
        with RunLock(tmp_path / "run"):
            pass
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with second:
        assert second.held
    assert not second.held


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not RunLock(tmp_path).acquire()  # held by a live process
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    lock = RunLock(tmp_path)
    while not lock.acquire() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.held
    lock.release()
