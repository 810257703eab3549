"""Run files: checksummed checkpoints, one-line refusals of bad ones, resume checks and
``load_run`` (flatmin.train.checkpoint)."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from flatmin.train import checkpoint as ckpt
from flatmin.train.config import TrainConfig
from flatmin.train.loop import Trainer
from tests.helpers import flip_a_stored_byte, truncate

CONFIG = TrainConfig(method="sgd", dataset="digits", model="mlp", epochs=2, subset=96,
                     batch_size=32)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(CONFIG, out, progress=False).run(stop_after=1)
    return out


@pytest.fixture
def copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_the_checksum_covers_every_entry(run_dir):
    state = torch.load(run_dir / ckpt.CHECKPOINT_NAME, weights_only=True)
    assert state["checksum"] == ckpt.state_checksum(state)
    assert len(state["checksum"]) == 64
    state["model"]["0.weight" if "0.weight" in state["model"] else "1.weight"][0, 0] += 1e-7
    assert ckpt.state_checksum(state) != state["checksum"]
    state = torch.load(run_dir / ckpt.CHECKPOINT_NAME, weights_only=True)
    state["epoch"] = 2
    assert ckpt.state_checksum(state) != state["checksum"]


def test_a_checkpoint_whose_bytes_changed_is_refused(copy):
    path = copy / ckpt.CHECKPOINT_NAME
    flip_a_stored_byte(path)
    torch.load(path, weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(ckpt.CheckpointError, match="is corrupted: its contents do not match"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        Trainer(CONFIG, copy, progress=False).run(resume=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: truncate(p), "cannot be read as a checkpoint"),
        (lambda p: p.write_text("not a checkpoint\n"), "cannot be read as a checkpoint"),
        (lambda p: torch.save(torch.ones(3), p), "is not a flatmin checkpoint"),
        (lambda p: torch.save({"model": {}, "config": {}}, p), "missing optimizer"),
    ],
)
def test_unreadable_and_foreign_files_get_one_line(copy, damage, message):
    path = copy / ckpt.CHECKPOINT_NAME
    damage(path)
    with pytest.raises(ckpt.CheckpointError, match=message) as info:
        ckpt.load_checkpoint(path)
    text = str(info.value)
    assert "\n" not in text and "weights_only" not in text


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_a_plain_pickle_gets_the_one_line_and_nothing_else(tmp_path, recwarn, capsys,
                                                           protocol):  # fmt: skip
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "epoch": 3}, f, protocol=protocol)
    with pytest.raises(ckpt.CheckpointError, match="cannot be read as a checkpoint"):
        ckpt.load_checkpoint(path)
    assert [str(w.message) for w in recwarn] == []
    assert capsys.readouterr() == ("", "")


def test_resume_refuses_another_number_of_processes(run_dir):
    with pytest.raises(ValueError, match=r"written by 1 process\(es\) \(--nproc 1\), not 2"):
        ckpt.resume_state(run_dir, CONFIG.resolved().to_dict(), resume=True, world_size=2)
    state = ckpt.resume_state(run_dir, CONFIG.resolved().to_dict(), resume=True, world_size=1)
    assert state["epoch"] == 1 and state["world_size"] == 1


def test_load_run_rebuilds_the_trained_model_and_its_data(run_dir):
    run = ckpt.load_run(run_dir)
    saved = torch.load(run_dir / ckpt.CHECKPOINT_NAME, weights_only=True)["model"]
    assert all(torch.equal(run.model.state_dict()[k], saved[k]) for k in saved)
    assert not run.model.training
    assert run.config.to_dict() == CONFIG.resolved().to_dict()
    assert len(run.data.train) == 96
    same = ckpt.load_run(run_dir / ckpt.CHECKPOINT_NAME)  # the file itself works too
    assert torch.equal(same.data.train.targets, run.data.train.targets)


def test_load_run_keeps_the_validation_split(tmp_path):
    config = TrainConfig(method="sgd", dataset="digits", model="mlp", epochs=1, subset=100,
                         val_fraction=0.25, label_noise=0.2)  # fmt: skip
    Trainer(config, tmp_path, progress=False).run()
    run = ckpt.load_run(tmp_path)
    trained_on = config.load_data(augment=False)
    assert len(run.data.train) == 75 and len(run.data.val) == 25
    assert torch.equal(run.data.train.targets, trained_on.train.targets)  # noisy labels too
