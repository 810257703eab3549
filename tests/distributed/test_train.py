"""The reference trainer on 2 gloo processes (flatmin.distributed.train).

The session's first spawn trains every registered method for an epoch (three of them for
two epochs, and for one epoch into a second directory); the second spawn — two new processes —
resumes those three from rank 0's files.
"""

from __future__ import annotations

import math

import pytest
import torch

from flatmin.distributed.train import main, run_distributed
from flatmin.train import checkpoint as ckpt
from flatmin.train.loop import TrainConfig
from flatmin.train.registry import METHODS
from tests.distributed.ddp_workers import TRAIN_RESUMED

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
        straight = torch.load(root / f"{method}-straight" / ckpt.CHECKPOINT_NAME)
        resumed = torch.load(root / f"{method}-split" / ckpt.CHECKPOINT_NAME)
        for key in ("model", "optimizer", "scheduler", "method_state", "epoch"):
            _assert_equal(straight[key], resumed[key], f"{method}/{key}")
        assert straight["metrics"][-1]["test_acc"] == resumed["metrics"][-1]["test_acc"]


def _assert_equal(a, b, path):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


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


def test_command_line_needs_nproc_outside_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--method", "sgd", "--dataset", "digits", "--out", str(tmp_path / "r")]) == 2
    assert "--nproc" in capsys.readouterr().err
