"""The reference trainer on 2 gloo processes (flatmin.train.ddp).

The session's first spawn trains every registered method for an epoch (three of them for
two epochs, and for one epoch into a second directory); the second spawn — two new processes —
resumes those three from rank 0's files.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from flatmin.train import checkpoint as ckpt
from flatmin.train.config import TrainConfig
from flatmin.train.ddp import run_distributed
from flatmin.train.loop import Trainer
from flatmin.train.registry import METHODS
from tests.distributed.ddp_workers import TRAIN_RESUMED, train_config
from tests.helpers import assert_runs_equal

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def root(ddp_resumed):
    return ddp_resumed


def test_every_registered_method_trains_on_two_processes(root):
    for method in METHODS:
        records = ckpt.read_metrics(root / f"{method}-straight" / ckpt.METRICS_NAME)
        assert [r["epoch"] for r in records] == ([1, 2] if method in TRAIN_RESUMED else [1]), method
        assert all(
            math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in records
        )


def test_resumed_runs_equal_uninterrupted_runs_bit_for_bit(root):
    for method in TRAIN_RESUMED:
        assert_runs_equal(root / f"{method}-straight" / ckpt.CHECKPOINT_NAME,
                                   root / f"{method}-split" / ckpt.CHECKPOINT_NAME)  # fmt: skip


def test_the_number_of_processes_is_recorded_and_a_resume_on_one_refused(root, tmp_path):
    shutil.copytree(root / "sam-split", tmp_path / "run")
    state = torch.load(tmp_path / "run" / ckpt.CHECKPOINT_NAME, weights_only=True)
    assert state["world_size"] == 2
    assert json.loads((tmp_path / "run" / ckpt.CONFIG_NAME).read_text())["world_size"] == 2
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) \(--nproc 2\), not 1"):
        Trainer(train_config("sam"), tmp_path / "run", progress=False).run(resume=True)
    assert torch.load(tmp_path / "run" / ckpt.CHECKPOINT_NAME, weights_only=True)["epoch"] == 2


def test_a_diverging_run_stops_on_every_process_together(tmp_path):
    config = TrainConfig(method="sgd", dataset="digits", model="mlp", epochs=3, subset=128,
                         batch_size=32, hyperparameters={"lr": 1e30})  # fmt: skip
    records = run_distributed(config, tmp_path, 2)  # a process that kept training would hang
    assert [r["epoch"] for r in records] == [1] and records[0]["diverged"] is True
    assert not (tmp_path / ckpt.CHECKPOINT_NAME).exists()  # no epoch had finite weights


def test_rejects_a_batch_that_does_not_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        run_distributed(
            TrainConfig(method="sgd", dataset="digits", batch_size=15), tmp_path / "r", 2
        )
    assert not (tmp_path / "r").exists()
