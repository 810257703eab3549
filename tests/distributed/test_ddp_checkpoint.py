"""SAM + SAF + MESA on 2 processes: equal teachers, and a rank-0 checkpoint that resumes
both restarted processes bit for bit (flatmin.distributed.checkpoint, .mesa)."""

from __future__ import annotations

import pytest
import torch

from flatmin.distributed.checkpoint import load_on_every_rank, save_on_rank0
from tests.distributed.ddp_workers import FULL_EPOCHS, FULL_RESUME_EPOCH
from tests.helpers import assert_trees_equal

pytestmark = pytest.mark.distributed
WORLD = 2


@pytest.fixture(scope="module")
def runs(ddp_resumed):
    out = ddp_resumed
    straight = [torch.load(out / f"full_straight_{r}.pt") for r in range(WORLD)]
    # written by two new processes that resumed from rank 0's checkpoint file
    resumed = [torch.load(out / f"full_resumed_{r}.pt") for r in range(WORLD)]
    return straight, resumed


def test_mesa_teachers_are_identical_on_every_process(runs):
    straight, resumed = runs
    for run in (*straight, *resumed):
        assert run["teacher_differences"] and all(d == 0.0 for d in run["teacher_differences"])
    assert len(straight[0]["teacher_differences"]) == FULL_EPOCHS
    assert len(resumed[0]["teacher_differences"]) == FULL_EPOCHS - FULL_RESUME_EPOCH
    assert_trees_equal(straight[0]["final"]["teacher"], straight[1]["final"]["teacher"])


def test_restart_from_rank0_checkpoint_is_bit_exact_on_every_rank(runs):
    straight, resumed = runs
    for rank in range(WORLD):
        assert_trees_equal(resumed[rank]["final"], straight[rank]["final"])
    assert_trees_equal(straight[0]["final"], straight[1]["final"])


def test_save_on_rank0_alone_writes_atomically_and_loads(tmp_path):
    path = tmp_path / "state.pt"
    save_on_rank0({"w": torch.arange(3)}, path, replicated=[torch.ones(2)])
    assert not (tmp_path / "state.pt.partial").exists()
    assert torch.equal(load_on_every_rank(path)["w"], torch.arange(3))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_on_every_rank(tmp_path / "missing.pt")
