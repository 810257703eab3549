"""``flatmin measure`` on a real checkpoint of a digits MLP, trained by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flatmin.cli import main
from flatmin.train.checkpoint import save_checkpoint
from flatmin.train.config import TrainConfig
from flatmin.train.data import load_dataset
from flatmin.train.loop import Trainer
from flatmin.train.models import build_model
from tests.cli.helpers import flatmin, uncreatable
from tests.helpers import assert_one_line_error, flip_a_stored_byte, truncate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A one-epoch digits MLP run and its model, rebuilt here from the saved weights."""
    out = tmp_path_factory.mktemp("run")
    Trainer(TrainConfig(method="sgd", dataset="digits", model="mlp", epochs=1), out,
            progress=False).run()  # fmt: skip
    model = build_model("mlp", digits.num_classes, digits.input_shape)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    return out, model


@pytest.fixture
def checkpoint(trained, tmp_path):
    out, model = trained
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((out / "checkpoint.pt").read_bytes())
    return path, model


def _first_samples(dataset, count):
    items = [dataset[i] for i in range(count)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def test_measure_writes_summary_and_figures(checkpoint, digits, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "measure"
    argv = [
        "measure", str(path), "--out", str(out),
        "--sharpness", "--hessian", "--trace", "--landscape", "2d", "--noise",
        "--batch-size", "32", "--max-batches", "2", "--max-iter", "8", "--top-k", "2",
        "--trace-queries", "6", "--steps", "5", "--noise-scales", "0,0.05,0.1",
        "--noise-repeats", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())

    x, y = _first_samples(digits.train, 64)
    with torch.no_grad():
        expected_loss = float(F.cross_entropy(model.eval()(x), y))
    assert summary["sharpness"]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert summary["landscape"]["center_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert summary["noise"]["mean"][0] == pytest.approx(expected_loss, rel=1e-5)
    for key in ("sharpness", "hessian", "trace", "landscape", "noise"):
        assert summary[key]["num_samples"] == 64
    assert len(summary["hessian"]["values"]) == 2
    assert summary["hessian"]["iterations"] <= 8
    assert summary["trace"]["num_queries"] == 6
    assert len(summary["landscape"]["losses"]) == 5
    assert summary["config"]["model"] == "mlp"
    assert set(summary["plots"]) == {"landscape_contour.png", "landscape_surface.png", "noise.png"}
    for name in summary["plots"]:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    printed = capsys.readouterr().out
    assert "hessian:" in printed and "summary.json" in printed


def test_measure_test_split_and_1d_landscape(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "m"
    argv = ["measure", str(path), "--out", str(out), "--landscape", "1d", "--split", "test",
            "--batch-size", "16", "--max-batches", "1", "--steps", "3"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "test" and summary["plots"] == ["landscape_1d.png"]
    assert summary["landscape"]["num_samples"] == 16


def test_measure_needs_something_to_measure(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["measure", str(path), "--out", str(tmp_path / "m")]) == 2
    assert "at least one" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "no checkpoint at"),
        (truncate, "cannot be read as a checkpoint"),
        (flip_a_stored_byte, "is corrupted: its contents do not match the checksum"),
        (lambda p: p.write_text("{}\n"), "cannot be read as a checkpoint"),
        (
            lambda p: torch.save({"model": {}, "config": {"model": "mlp"}}, p),
            "is not a flatmin checkpoint",
        ),
        (
            lambda p: torch.save(build_model("cnn", 10, (1, 8, 8)).state_dict(), p),
            "is not a flatmin checkpoint",
        ),
    ],
)
def test_measure_refuses_bad_checkpoints_in_one_line(checkpoint, tmp_path, capsys, damage,
                                                     message):  # fmt: skip
    path, _ = checkpoint
    damage(path)
    assert main(["measure", str(path), "--out", str(tmp_path / "m"), "--sharpness"]) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin measure: error:", message)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("change", "model"),
    [
        (lambda state: state.update(model=build_model("cnn", 10, (1, 8, 8)).state_dict()), "mlp"),
        (lambda state: state["config"].update(model="cnn"), "cnn"),
    ],
)
def test_measure_refuses_weights_that_do_not_fit_the_model_in_one_line(checkpoint, tmp_path,
                                                                       capsys, change, model):  # fmt: skip
    # A well-formed checkpoint (its checksum matches) whose weights are another model's.
    path, _ = checkpoint
    state = torch.load(path, weights_only=True)
    change(state)
    save_checkpoint(path, state)
    assert main(["measure", str(path), "--out", str(tmp_path / "m"), "--sharpness"]) == 2
    assert_one_line_error(capsys.readouterr().err, f"flatmin measure: error: {path}: the saved "
                          f"weights do not fit the model {model!r} for digits")  # fmt: skip
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--rho", "inf"], "--rho must be a finite number >= 0.0, got inf"),
        (["--rho", "-0.05"], "--rho must be a finite number >= 0.0"),
        (["--tol", "0"], "--tol must be a finite number > 0.0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--noise-scales", "0,nan"], "--noise-scales must be a finite number >= 0.0"),
        (["--device", "not-a-device"], "--device 'not-a-device' is not a device"),
    ],
)
def test_measure_refuses_bad_options_before_writing(checkpoint, tmp_path, capsys, option,
                                                    message):  # fmt: skip
    path, _ = checkpoint
    argv = ["measure", str(path), "--out", str(tmp_path / "m"), "--sharpness", *option]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "m").exists()


def test_measure_refuses_an_out_that_is_a_file_before_measuring(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    (tmp_path / "m").write_text("my notes\n")
    argv = ["measure", str(path), "--out", str(tmp_path / "m"), "--sharpness"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert_one_line_error(
        captured.err, "flatmin measure: error: --out", "is a file, not a directory"
    )
    assert captured.out == ""  # no measurement was printed: none was made
    assert (tmp_path / "m").read_text() == "my notes\n"


def test_measure_refuses_an_out_that_cannot_be_created(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = uncreatable(tmp_path)
    assert main(["measure", str(path), "--out", out, "--sharpness"]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, f"flatmin measure: error: --out {out} cannot be created")
    assert captured.out == ""


def test_measure_leaves_no_out_behind_when_the_checkpoint_is_refused(checkpoint, tmp_path,
                                                                     capsys):  # fmt: skip
    path, _ = checkpoint
    truncate(path)
    out = tmp_path / "a" / "b" / "m"
    assert main(["measure", str(path), "--out", str(out), "--sharpness"]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot be read as a checkpoint")
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.slow
@pytest.mark.parametrize("figure", [["--landscape", "1d"], ["--noise"]])
def test_measure_names_the_missing_plot_extra_before_measuring(checkpoint, tmp_path, figure):
    path, _ = checkpoint
    out = tmp_path / "m"
    argv = ["measure", str(path), "--out", str(out), "--sharpness", *figure,
            "--max-batches", "1", "--steps", "3", "--noise-repeats", "1"]  # fmt: skip
    done = flatmin(argv, hidden=["matplotlib"])
    assert done.returncode == 2, done.stderr
    assert_one_line_error(
        done.stderr, "optional package 'matplotlib'", "pip install 'flatmin[plot]'"
    )
    assert done.stdout == ""  # the sharpness was not measured either
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_measure_on_cuda_without_cuda_says_so(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    argv = ["measure", str(path), "--out", str(tmp_path / "m"), "--sharpness", "--device", "cuda"]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, "--device cuda: CUDA is not available here")
    assert not (tmp_path / "m").exists()


def test_measure_reads_a_run_directory_with_its_validation_split(tmp_path):
    config = TrainConfig(method="sgd", dataset="digits", model="mlp", epochs=1,
                         val_fraction=0.25)  # fmt: skip
    Trainer(config, tmp_path / "run", progress=False).run()
    argv = ["measure", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--sharpness",
            "--max-batches", "0", "--batch-size", "512"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["sharpness"]["num_samples"] == 1437 - round(0.25 * 1437)


@pytest.mark.slow
def test_measure_runs_as_a_real_process(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "proc"
    command = [sys.executable, "-m", "flatmin.cli", "measure", str(path), "--out", str(out),
               "--sharpness", "--max-batches", "1", "--batch-size", "8"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning:flatmin"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "sharpness:" in done.stdout
    assert json.loads((out / "summary.json").read_text())["sharpness"]["num_samples"] == 8
