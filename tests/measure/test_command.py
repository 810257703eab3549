"""``flatmin measure`` on a real checkpoint of a digits MLP, written by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flatmin.cli import main
from flatmin.train.data import load_dataset
from flatmin.train.models import build_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture
def checkpoint(tmp_path, digits):
    torch.manual_seed(3)
    model = build_model("mlp", digits.num_classes, digits.input_shape)
    config = {"model": "mlp", "dataset": "digits", "data_dir": None, "seed": 0, "method": "sgd"}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": config}, path)
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
    ("content", "message"),
    [
        (None, "no checkpoint"),
        ({"model": {}}, "'model' and 'config'"),
        ({"model": {}, "config": {"model": "mlp"}}, "lacks"),
    ],
)
def test_measure_rejects_bad_checkpoints(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        torch.save(content, path)
    assert main(["measure", str(path), "--out", str(tmp_path / "m"), "--sharpness"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


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
