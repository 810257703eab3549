"""The launcher's input checks and its single-process fallbacks (flatmin.distributed.launch).

Spawning real groups is exercised by every two-process test of this directory.
"""

from __future__ import annotations

import socket

import pytest

from flatmin.distributed.launch import LOCALHOST, free_port, init_from_env, spawn


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
