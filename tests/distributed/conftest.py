"""A few spawns of gloo processes serve every test module of this directory.

Starting processes (each imports torch) dominates the cost of these tests, so the
session spawns two processes once for every scenario that needs no earlier result, DDP
and FSDP2 alike (``rounds.py``), and once more — two new processes — for those that
resume from the first round's checkpoints; the test modules read the files the workers
wrote. The FSDP2 scenarios run once more on four processes (slow tests only).
"""

from __future__ import annotations

import pytest

from flatmin.distributed.launch import spawn
from tests.distributed import fsdp_workers
from tests.distributed.rounds import first_round, resumed_round

WORLD = 2


@pytest.fixture(scope="session")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(first_round, WORLD, str(out))
    return out


@pytest.fixture(scope="session")
def ddp_resumed(ddp_results):
    spawn(resumed_round, WORLD, str(ddp_results))
    return ddp_results


@pytest.fixture(scope="session")
def fsdp_results(ddp_results):
    """The FSDP2 scenarios' files of the first round (two processes)."""
    return ddp_results


@pytest.fixture(scope="session")
def fsdp_resumed(ddp_resumed):
    """… and of the second round (new processes resuming sharded checkpoints)."""
    return ddp_resumed


@pytest.fixture(scope="session")
def fsdp_results_4(tmp_path_factory):
    """The FSDP2 scenarios on four processes."""
    out = tmp_path_factory.mktemp("fsdp4")
    spawn(fsdp_workers.every_first_run, 4, str(out))
    return out
