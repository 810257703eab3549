import json

import numpy as np

from flatmin.bench.figures import plot_per_epoch, read_curves


def _write_run(section, name, losses, start_epoch=None):
    run = section / name
    run.mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "train_loss": v, "sharpness": v / 10}) for i, v in enumerate(losses)]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "final.json").write_text("{}")
    if start_epoch is not None:
        (run / "config.json").write_text(json.dumps({"start_epoch": start_epoch}))


def test_curves_of_finished_runs_cut_to_the_shortest(tmp_path):
    _write_run(tmp_path, "sgd-s0", [3.0, 2.0, 1.0])
    _write_run(tmp_path, "sgd-s1", [5.0, 4.0])
    unfinished = tmp_path / "sgd-s2"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text(json.dumps({"train_loss": 9.0}) + "\n")
    curves = read_curves(tmp_path, "sgd", "train_loss")
    np.testing.assert_array_equal(curves, [[3.0, 2.0], [5.0, 4.0]])
    assert read_curves(tmp_path, "sam", "train_loss").size == 0


def test_per_epoch_figure_is_a_png(tmp_path):
    _write_run(tmp_path, "sgd-s0", [3.0, 2.0, 1.0])
    _write_run(tmp_path, "saf-s0", [3.0, 2.5, 1.5], start_epoch=0)
    path = plot_per_epoch(tmp_path, "sharpness", "sharpness", "test", tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
