"""One group of two gloo processes runs every first-round scenario for all test modules.

Starting processes (each imports torch) dominates the cost of these tests, so the
session spawns once and every module reads the files the workers wrote.
"""

from __future__ import annotations

import pytest

from flatmin.distributed.launch import spawn
from tests.distributed.ddp_workers import every_first_run

WORLD = 2


@pytest.fixture(scope="session")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(every_first_run, WORLD, str(out))
    return out
