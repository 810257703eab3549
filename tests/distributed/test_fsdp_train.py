"""The reference trainer on FSDP2 (flatmin.train.fsdp) on 2 gloo processes.

The session's first spawn trains four methods for two epochs with ``FSDPTrainer``,
straight and stopped after one; the second spawn — two new processes — resumes the
stopped ones from their sharded checkpoints. The shards are compared after gathering them
with torch's own converter (``dcp_to_torch_save``).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from flatmin.train import checkpoint as ckpt
from flatmin.train.checkpoint import CheckpointError, load_run, shard_problem
from tests.distributed.fsdp_workers import TRAIN_FSDP
from tests.helpers import assert_trees_equal, without_timings

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def root(fsdp_resumed):
    return fsdp_resumed


def gathered(run_dir, tmp_path):
    """The run's checkpoint.pt and its shards gathered into one state dict."""
    state = torch.load(run_dir / ckpt.CHECKPOINT_NAME, weights_only=True)
    whole = tmp_path / f"{run_dir.name}.pt"
    dcp_to_torch_save(run_dir / state["sharded"]["directory"], whole)
    return state, torch.load(whole, weights_only=False)


def test_every_method_trains_with_sharded_checkpoints(root):
    for method in TRAIN_FSDP:
        run = root / f"fsdp-{method}-straight"
        records = ckpt.read_metrics(run / ckpt.METRICS_NAME)
        assert [r["epoch"] for r in records] == [1, 2], method
        assert all(
            math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in records
        )
        state = torch.load(run / ckpt.CHECKPOINT_NAME, weights_only=True)
        assert state["world_size"] == 2 and state["model"] == {}
        assert [p.name for p in run.glob("checkpoint-shards-*")] == [state["sharded"]["directory"]]
        assert json.loads((run / ckpt.CONFIG_NAME).read_text())["fsdp"] is True


def test_resumed_runs_equal_uninterrupted_runs_bit_for_bit(root, tmp_path):
    for method in TRAIN_FSDP:
        straight, straight_shards = gathered(root / f"fsdp-{method}-straight", tmp_path)
        resumed, resumed_shards = gathered(root / f"fsdp-{method}-split", tmp_path)
        assert set(straight_shards) >= {"model", "optimizer", "rng"}
        assert_trees_equal(straight_shards, resumed_shards, method)  # every process's RNG too
        assert_trees_equal(straight["scheduler"], resumed["scheduler"])
        assert without_timings(straight["metrics"]) == without_timings(resumed["metrics"])
    saf = gathered(root / "fsdp-saf-straight", tmp_path)[1]["method_state"]["saf"]["store"]
    assert saf["logits"].shape[1] == 48  # the sharded store, gathered: every sample's rows


def test_a_sharded_run_is_measured_from_its_gathered_weights(root, tmp_path):
    run = root / "fsdp-sam-straight"
    loaded = load_run(run)
    weights = gathered(run, tmp_path)[1]["model"]
    assert_trees_equal(dict(loaded.model.state_dict()), weights)


def test_resuming_with_the_other_kind_of_checkpoint_is_refused(root):
    config = json.loads((root / "fsdp-sam-straight" / ckpt.CONFIG_NAME).read_text())
    for key in ("data", "world_size", "fsdp"):
        config.pop(key)
    with pytest.raises(ValueError, match=r"is sharded \(trained with --fsdp\): resume it with"):
        ckpt.resume_state(root / "fsdp-sam-straight", config, resume=True, world_size=2)
    with pytest.raises(ValueError, match=r"is not sharded \(trained without --fsdp\)"):
        ckpt.resume_state(root / "sam-straight", config, resume=True, world_size=2, sharded=True)


def test_changed_or_missing_shards_are_refused_in_one_line(root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp-sam-straight", run)
    state = torch.load(run / ckpt.CHECKPOINT_NAME, weights_only=True)
    directory, expected = run / state["sharded"]["directory"], state["sharded"]["digests"]
    assert shard_problem(directory, expected) is None
    shard = next(directory.glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    shard.write_bytes(bytes(raw))
    problem = shard_problem(directory, expected)
    assert f"{shard.name} changed after it was written" in problem and "\n" not in problem
    with pytest.raises(CheckpointError, match="is corrupted"):
        load_run(run)
    shutil.rmtree(directory)
    assert "the checkpoint's shards are gone" in shard_problem(directory, expected)
