"""Two spawns of two gloo processes serve every test module of this directory.

Starting processes (each imports torch) dominates the cost of these tests, so the
session spawns once for every scenario that needs no earlier result and once more —
two new processes — for those that resume from the first round's rank-0 checkpoints;
the test modules read the files the workers wrote.
"""

from __future__ import annotations

import pytest

from flatmin.distributed.launch import spawn
from tests.distributed.ddp_workers import every_first_run, every_resumed_run

WORLD = 2


@pytest.fixture(scope="session")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(every_first_run, WORLD, str(out))
    return out


@pytest.fixture(scope="session")
def ddp_resumed(ddp_results):
    spawn(every_resumed_run, WORLD, str(ddp_results))
    return ddp_results
