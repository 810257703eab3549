import statistics

import pytest

from flatmin.bench.demo import DemoPreset, MethodResult, run_demo, table
from flatmin.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_preset() -> DemoPreset:
    return DemoPreset(
        dataset="digits",
        model="mlp",
        epochs=2,
        seeds=2,
        batch_size=64,
        methods={
            "sgd": {"lr": 0.1},
            "sam": {"lr": 0.1, "rho": 0.1},
            "saf": {"lr": 0.1, "start_epoch": 0, "lag_epochs": 1},
            "mesa": {"lr": 0.1, "start_epoch": 0, "ema_decay": 0.9},
        },
    )


def _without_times(records):
    timings = ("wall_time", "images_per_s", "images_per_cpu_s")
    return [{k: v for k, v in r.items() if k not in timings} for r in records]


def test_table_reports_mean_std_speed_and_memory():
    def runs(accs, speed):
        return [[{"test_acc": a, "train_loss": 0.5, "images_per_cpu_s": speed}] for a in accs]

    results = [
        MethodResult("sgd", runs([0.60, 0.70, 0.65], 1000.0), 0),
        MethodResult("sam", runs([0.72, 0.74, 0.76], 500.0), 3 * 1024 * 1024),
    ]
    lines = table(results).splitlines()
    assert lines[2] == "| sgd | 65.0 ± 5.0 | 0.500 | 1.00× | 0 B |"
    std = statistics.stdev([72.0, 74.0, 76.0])
    assert lines[3] == f"| sam | 74.0 ± {std:.1f} | 0.500 | 0.50× | 3.0 MB |"


def test_run_demo_trains_every_method_and_seed(tmp_path):
    preset = _tiny_preset()
    results = run_demo(preset, tmp_path, log=None, progress=False)
    assert [r.method for r in results] == ["sgd", "sam", "saf", "mesa"]
    for result in results:
        assert len(result.records) == 2 and all(len(runs) == 2 for runs in result.records)
        for seed in range(2):
            assert (tmp_path / f"{result.method}-seed{seed}" / "checkpoint.pt").is_file()
    by_name = {r.method: r for r in results}
    assert by_name["sgd"].extra_memory_bytes == 0
    assert by_name["sam"].extra_memory_bytes == by_name["mesa"].extra_memory_bytes > 0
    # The seeds differ, so their runs do.
    sgd = by_name["sgd"].records
    assert sgd[0][-1]["train_loss"] != sgd[1][-1]["train_loss"]


@pytest.mark.slow
def test_parallel_runs_give_the_same_results(tmp_path):
    preset = _tiny_preset()
    serial = run_demo(preset, tmp_path / "serial", log=None, progress=False)
    parallel = run_demo(preset, tmp_path / "parallel", processes=2, log=None)
    for a, b in zip(serial, parallel, strict=True):
        assert a.method == b.method and a.extra_memory_bytes == b.extra_memory_bytes
        assert [_without_times(r) for r in a.records] == [_without_times(r) for r in b.records]


def test_demo_command_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["bench", "--preset", "demo", "--epochs", "1", "--seeds", "1", "--threads", "1"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MNIST-1D, 40% symmetric label noise" in text
    assert "short-run scaling" in text
    assert "| method | test acc. (%) |" in text
    for method in ("sgd", "sam", "saf", "mesa"):
        assert f"| {method} |" in text
        assert (out / f"{method}-seed0" / "metrics.jsonl").is_file()
    png = (out / "demo.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert "| sam |" in (out / "summary.md").read_text()


def test_demo_rejects_nonpositive_counts(tmp_path, capsys):
    assert main(["bench", "--preset", "demo", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds, --epochs and --threads must be >= 1" in capsys.readouterr().err


def test_the_plot_marks_where_the_trajectory_terms_start():
    # start_epoch 5: 0-based epochs 0–5 train without the term, so logged epochs 1–6 do
    # and logged epoch 7 is the first with it.
    x, label = DemoPreset().term_start_marker()
    assert 6 < x < 7 and "start" in label
