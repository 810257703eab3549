"""The launcher's input checks and its single-process fallbacks (flatmin.distributed.launch).

Spawning real groups is exercised by every two-process test of this directory.
"""

from __future__ import annotations

import socket

import pytest

from flatmin.distributed.launch import LOCALHOST, free_port, init_from_env, spawn
from tests.distributed.ddp_workers import finish_at_different_times, refuse_on_rank_1


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, port))


@pytest.mark.parametrize("nprocs", [0, -1, 1.5, True])
def test_spawn_rejects_a_bad_process_count(nprocs):
    with pytest.raises(ValueError, match="positive int"):
        spawn(print, nprocs)


def test_spawn_rejects_what_is_not_callable():
    with pytest.raises(TypeError, match="callable"):
        spawn("train", 2)


def test_init_from_env_without_torchrun_is_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == (0, 1)


@pytest.mark.distributed
def test_no_process_leaves_the_group_before_the_others_are_done(tmp_path):
    """spawn waits at a barrier before leaving the group: a rank that finished early
    (rank 1) exits only after the slow rank's function has returned."""
    spawn(finish_at_different_times, 2, str(tmp_path))
    slow_returned = float((tmp_path / "returned_0").read_text())
    fast_returned = float((tmp_path / "returned_1").read_text())
    fast_exited = float((tmp_path / "exited_1").read_text())
    assert slow_returned - fast_returned > 0.5
    assert fast_exited >= slow_returned


@pytest.mark.distributed
def test_an_exception_in_a_process_is_raised_as_itself(tmp_path):
    with pytest.raises(ValueError, match="rank 1 refuses") as info:
        spawn(refuse_on_rank_1, 2)
    assert "ProcessRaisedException" in type(info.value.__cause__).__name__
