"""``flatmin plot`` on run directories written by the test."""

from __future__ import annotations

import json
import math

import pytest

from flatmin.cli import main
from flatmin.cli.plot import read_run_curves, read_runs
from tests.cli.helpers import uncreatable
from tests.helpers import assert_one_line_error


def _write_run(path, method, sharpness=True, epochs=4):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"method": method, "seed": 0}))
    lines = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, "train_loss": 2.0 / epoch, "test_acc": 0.5 + 0.1 * epoch}
        if sharpness and epoch % 2 == 0:
            record["sharpness"] = 0.1 / epoch
        lines.append(json.dumps(record))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_load_run_reads_curves_and_marks_missing_sharpness(tmp_path):
    run = read_run_curves(_write_run(tmp_path / "a", "saf"))
    assert run.label == "saf"
    assert run.epochs == [1, 2, 3, 4]
    assert run.train_loss == [2.0, 1.0, 2.0 / 3, 0.5]
    assert math.isnan(run.sharpness[0]) and run.sharpness[1] == 0.05
    assert run.has_sharpness
    assert not read_run_curves(_write_run(tmp_path / "b", "sgd", sharpness=False)).has_sharpness


def test_runs_of_one_method_get_distinct_labels(tmp_path):
    dirs = [_write_run(tmp_path / name, "sam") for name in ("seed0", "seed1")]
    assert [r.label for r in read_runs(dirs)] == ["sam (seed0)", "sam (seed1)"]


def test_cli_writes_the_overlay(tmp_path, capsys):
    a = _write_run(tmp_path / "a", "sgd", sharpness=False)
    b = _write_run(tmp_path / "b", "saf")
    out = tmp_path / "fig" / "runs.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "", "{not json\n"])
def test_cli_rejects_a_broken_run_dir(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "flatmin plot:" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_refuses_an_out_that_is_a_directory(tmp_path, capsys):
    run = _write_run(tmp_path / "a", "sgd")
    (tmp_path / "fig").mkdir()
    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, "flatmin plot: error: --out", "is a directory, not a file")
    assert captured.out == "" and list((tmp_path / "fig").iterdir()) == []


def test_cli_refuses_an_out_that_cannot_be_created(tmp_path, capsys):
    run = _write_run(tmp_path / "a", "sgd")
    for out in (f"{uncreatable(tmp_path)}/runs.png", "/proc/nope/x.png"):
        assert main(["plot", str(run), "--out", out]) == 2
        assert_one_line_error(capsys.readouterr().err, f"flatmin plot: error: --out {out} cannot "
                              "be created")  # fmt: skip
