"""flatmin train: what a run directory promises (README, "What a run directory promises") —
resume continues bit-exactly or refuses in one line, one run per directory, output paths
checked first, files readable as open() makes them, nothing of a run lost by a refusal."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from flatmin.cli import main
from flatmin.train.checkpoint import save_checkpoint
from flatmin.train.lock import RunLock
from flatmin.train.models import build_model
from tests.cli.helpers import TINY, flatmin, train_tiny, uncreatable
from tests.helpers import (
    assert_one_line_error,
    assert_runs_equal,
    flip_a_stored_byte,
    truncate,
    umask,
    write_cifar10,
)


def test_stop_after_then_resume_equals_a_straight_run(tmp_path):
    assert train_tiny(tmp_path, "--method", "sam", "--epochs", "3", out="straight") == 0
    assert train_tiny(tmp_path, "--method", "sam", "--epochs", "3", "--stop-after", "1") == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (["--method", "sam"], "trained with method 'sgd', not 'sam'"),
        (["--model", "cnn"], "trained with model 'mlp', not 'cnn'"),
        (["--dataset", "mnist1d"], "trained with dataset 'digits', not 'mnist1d'"),
        (["--epochs", "5"], "epochs 2 → 5"),
    ],
)
def test_incompatible_resume_refuses_and_says_why(tmp_path, capsys, change, reason):
    assert train_tiny(tmp_path, "--epochs", "2", "--stop-after", "1") == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", *change]) == 2
    assert reason in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_resume_without_a_run_says_so(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no run to continue" in capsys.readouterr().err


@pytest.mark.slow
def test_two_runs_started_together_on_one_directory_do_not_mix(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--subset", "400", "--epochs", "30", "--threads", "1", "--quiet",
            "--out", str(out)]  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: flatmin(args), range(2)))
    assert sorted(d.returncode for d in done) == [0, 2], [d.stderr for d in done]
    loser = next(d for d in done if d.returncode == 2)
    assert_one_line_error(loser.stderr, f"{out} is in use by another flatmin process")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 31))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 30 and state["metrics"] == records
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_run_directory_in_use_is_refused_at_once(tmp_path, capsys, nproc):
    with RunLock(tmp_path / "run"):  # another run holds it
        assert train_tiny(tmp_path, "--epochs", "1", "--nproc", nproc) == 2
    assert_one_line_error(capsys.readouterr().err, "is in use by another flatmin process")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("my notes\n")
    assert train_tiny(tmp_path, "--epochs", "1") == 2
    assert_one_line_error(capsys.readouterr().err, "--out", "is a file, not a directory")
    assert (tmp_path / "run").read_text() == "my notes\n"


def test_an_out_that_cannot_be_created_is_refused(tmp_path, capsys):
    out = uncreatable(tmp_path)
    assert main(["train", *TINY, "--epochs", "1", "--out", out]) == 2
    assert_one_line_error(capsys.readouterr().err, f"--out {out} cannot be created")


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_run_files_get_the_mode_open_gives(tmp_path, mask):
    with umask(mask) as mode:
        assert train_tiny(tmp_path, "--epochs", "1", "--quiet") == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == mode, name


# --- resuming -------------------------------------------------------------------------


def test_resume_with_data_loader_workers_is_bit_exact(tmp_path):
    args = ["--method", "sam", "--epochs", "3", "--num-workers", "1", "--quiet"]
    assert train_tiny(tmp_path, *args, out="straight") == 0
    assert train_tiny(tmp_path, *args, "--stop-after", "1") == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    assert_runs_equal(tmp_path / "straight" / "checkpoint.pt",
                               tmp_path / "run" / "checkpoint.pt")  # fmt: skip


def test_resume_with_workers_that_augment_is_bit_exact(tmp_path):
    # CIFAR training items are randomly cropped and flipped inside the worker process,
    # from the worker's own torch generator: a resumed epoch must draw the same crops.
    write_cifar10(tmp_path / "cifar", per_batch=16, num_test=8)
    args = ["--method", "sam", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"),
            "--model", "mlp", "--batch-size", "16", "--augment", "--num-workers", "1",
            "--epochs", "3", "--quiet"]  # fmt: skip
    assert main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    assert main(["train", *args, "--stop-after", "1", "--out", str(tmp_path / "run")]) == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert straight["config"]["augment"] and straight["config"]["num_workers"] == 1
    assert_runs_equal(straight, tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_a_stored_byte, "is corrupted: its contents do not match the checksum"),
        (truncate, "cannot be read as a checkpoint"),
        (lambda p: p.write_bytes(b"PK\x03\x04 not really"), "cannot be read as a checkpoint"),
    ],
)
def test_resume_refuses_a_damaged_checkpoint_in_one_line(tmp_path, capsys, damage, message):
    assert train_tiny(tmp_path, "--epochs", "2", "--stop-after", "1", "--quiet") == 0
    damage(tmp_path / "run" / "checkpoint.pt")
    damaged = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin train: error:", message)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == damaged


def test_resume_refuses_another_models_checkpoint(tmp_path, capsys):
    assert train_tiny(tmp_path, "--epochs", "2", "--stop-after", "1", "--quiet") == 0
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--subset", "64",
                 "--epochs", "2", "--stop-after", "1", "--quiet",
                 "--out", str(tmp_path / "cnn")]) == 0  # fmt: skip
    shutil.copy(tmp_path / "cnn" / "checkpoint.pt", tmp_path / "run" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert_one_line_error(capsys.readouterr().err, "trained with model 'cnn', not 'mlp'")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.distributed
def test_a_two_process_run_resumed_on_one_process_is_refused_and_left_as_it_was(tmp_path,
                                                                                capsys):  # fmt: skip
    assert (
        train_tiny(tmp_path, "--epochs", "2", "--stop-after", "1", "--nproc", "2", "--quiet") == 0
    )
    before = _files(tmp_path / "run")
    assert "checkpoint.pt" in before
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin train: error: cannot resume",
                          "written by 2 process(es) (--nproc 2), not 1")  # fmt: skip
    assert _files(tmp_path / "run") == before


def test_resume_refuses_weights_that_do_not_fit_the_model_and_changes_nothing(tmp_path, capsys):
    # A well-formed checkpoint (its checksum matches) of the run's settings whose weights
    # are another model's.
    assert train_tiny(tmp_path, "--epochs", "2", "--stop-after", "1", "--quiet") == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    state["model"] = build_model("cnn", 10, (1, 8, 8)).state_dict()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", state)
    before = _files(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin train: error:",
                          "saved weights do not fit the model 'mlp' for digits")  # fmt: skip
    assert _files(tmp_path / "run") == before


# --- errors of every kind are one line ------------------------------------------------
