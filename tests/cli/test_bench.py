import json

import pytest

from flatmin.cli import main
from flatmin.cli.bench import MODES, PRESETS
from flatmin.train.models import build_model
from flatmin.trajectory import _topk_compiled
from tests.cli.helpers import uncreatable
from tests.helpers import assert_one_line_error


def test_no_benchmark_named_lists_the_choices(capsys):
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "--preset demo" in err
    for name in (*PRESETS, *MODES):
        assert name in err


def test_two_different_benchmarks_are_refused(capsys):
    assert main(["bench", "speed", "--preset", "demo"]) == 2
    assert "name one benchmark" in capsys.readouterr().err


def test_positional_and_flag_forms_reach_the_same_preset(tmp_path, capsys):
    # The demo's own argument check answers, so both forms dispatched to it.
    for form in (["demo"], ["--preset", "demo"]):
        assert main(["bench", *form, "--seeds", "0", "--out", str(tmp_path)]) == 2
        assert "--seeds, --epochs and --threads must be >= 1" in capsys.readouterr().err


def test_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "demo: SGD, SAM, SAF and MESA on MNIST-1D with 40 % label noise" in text
    for name in MODES:
        assert f"{name}:" in text


def test_report_without_finished_runs_refuses_and_keeps_the_tables(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "accuracy_quick.txt").write_text("the last real report\n")
    (results / "accuracy_quick.json").write_text('{"sections": {"kept": 1}}')
    code = main(["bench", "accuracy", "--report", "--out", str(tmp_path / "no-runs"),
                 "--results", str(results)])  # fmt: skip
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "no finished runs of the quick study",
                          "left as they are")  # fmt: skip
    assert (results / "accuracy_quick.txt").read_text() == "the last real report\n"
    assert (results / "accuracy_quick.json").read_text() == '{"sections": {"kept": 1}}'


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--repeats", "0"], "--repeats must be an integer >= 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be an integer >= 1, got -2"),
        (["--methods", "lion"], "unknown models or methods ['lion']"),
    ],
)
def test_speed_refuses_bad_counts_before_timing(tmp_path, capsys, option, message):
    argv = ["bench", "speed", "--models", "cnn1d", "--methods", "sgd", "--repeats", "1",
            "--out", str(tmp_path), *option]  # fmt: skip
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin bench speed: error:", message)
    assert list(tmp_path.iterdir()) == []


# Each benchmark with its output flag and the smallest options it accepts.
_OUTPUTS = {
    "demo": ("--out", ["--seeds", "1", "--epochs", "1", "--threads", "1"]),
    "speed": ("--out", ["--models", "cnn1d", "--methods", "sgd", "--repeats", "1", "--steps", "1"]),
    "accuracy": ("--out", ["--sections", "fmnist-search", "--seeds", "1", "--epochs", "1"]),
    "accuracy --report": ("--results", ["--out", "RUNS"]),
    "figures": ("--out", ["--runs", "RUNS"]),
    "topk-speed": (
        "--out",
        ["--classes", "12", "--top-k", "3", "--samples", "64", "--repeats", "1"],
    ),
    "topk-memory": ("--out", []),
    "fsdp-speed": ("--out", ["--fsdp-models", "mlp", "--repeats", "1", "--steps", "1"]),
    "sharded-store": ("--out", ["--worlds", "1", "--store-cases", "11x7", "--repeats", "1"]),
}


@pytest.mark.parametrize("benchmark", list(_OUTPUTS))
@pytest.mark.parametrize("unusable", ["a file", "cannot be created"])
def test_an_output_path_that_cannot_be_used_is_refused_before_any_work(tmp_path, capsys,
                                                                       benchmark, unusable):  # fmt: skip
    flag, options = _OUTPUTS[benchmark]
    if unusable == "a file":
        out = tmp_path / "notes"
        out.write_text("my notes\n")
        message = f"{flag} {out} is a file, not a directory"
    else:
        out = uncreatable(tmp_path)
        message = f"{flag} {out} cannot be created"
    options = [str(tmp_path) if o == "RUNS" else o for o in options]
    assert main(["bench", *benchmark.split(), *options, flag, str(out)]) == 2
    captured = capsys.readouterr()
    name = benchmark.split()[0]
    assert_one_line_error(captured.err, f"flatmin bench {name}: error: {message}")
    assert captured.out == ""  # nothing was run, so nothing was reported
    if unusable == "a file":
        assert out.read_text() == "my notes\n"


def test_figures_without_runs_says_where_it_looked(tmp_path, capsys):
    assert main(["bench", "figures", "--runs", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert_one_line_error(capsys.readouterr().err, f"no runs in {tmp_path / 'mnist1d-noise40'}")


def test_report_of_some_sections_has_its_own_tables_and_leaves_the_study_s_alone(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    (results / "accuracy_quick.txt").write_text("the whole study's tables\n")
    for label, acc in (("sgd", 0.5), ("sam-rho0.1", 0.6)):
        for seed in (0, 1):
            run = runs / "fmnist-search" / f"{label}-s{seed}"
            run.mkdir(parents=True)
            final = {"test_acc": acc + seed / 100, "sam_sharpness": 0.01, "lambda_max": 2.0,
                     "train_loss": 1.0, "train_wall_time": 5.0}  # fmt: skip
            (run / "final.json").write_text(json.dumps(final))
    code = main(["bench", "accuracy", "--report", "--sections", "fmnist-search",
                 "--out", str(runs), "--results", str(results)])  # fmt: skip
    assert code == 0
    text = (results / "accuracy_quick_fmnist-search.txt").read_text()
    assert "| sam-rho0.1 | 2 | 60.50 ± 0.71 | +10.00" in text
    assert "MNIST-1D" not in text  # the other sections are not reported
    assert (results / "accuracy_quick.txt").read_text() == "the whole study's tables\n"


def test_topk_speed_and_memory_write_their_tables(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["bench", "topk-speed", "--classes", "12", "--top-k", "3", "--samples", "64",
                 "--batch-size", "16", "--repeats", "1", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    speed = json.loads((out / "topk_speed_t1.json").read_text())
    compiled = ["top_k=3"] if _topk_compiled.ENABLED else []  # the compiled loops: numba
    assert [r["store"] for r in speed["12"]["rows"]] == ["full rows", *compiled, "top_k=3, eager"]
    assert "| top_k=3, eager |" in (out / "topk_speed_t1.txt").read_text()
    code = main(["bench", "topk-memory", "--memmap-samples", "200", "--out", str(out)])
    assert code == 0
    memory = json.loads((out / "topk_memory.json").read_text())
    assert set(memory["table"]) == {"CIFAR-100", "ImageNet-1k", "ImageNet-21k"}
    assert memory["memmap"]["file_bytes"] == 3 * 200 * 44  # k = 10 of 1000 classes: 44-byte rows
    assert not (out / "topk_memmap_store.bin").exists()
    capsys.readouterr()
    assert main(["bench", "topk-speed", "--samples", "0", "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "--samples must be an integer >= 1, got 0")


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_speed_and_sharded_store_write_their_tables(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["bench", "fsdp-speed", "--fsdp-models", "mlp", "--repeats", "1", "--steps",
                 "1", "--batch-size", "8", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    speed = json.loads((out / "fsdp_speed_t1.json").read_text())["models"]["mlp"]
    assert set(speed["ratio"]) == {"sam", "sam_vs_per_process", "saf"}
    held = speed["parameter_bytes_per_process"]
    whole = build_model("mlp", 10, (1, 28, 28)).parameters()
    assert held["ddp_sam_global"] == 4 * sum(p.numel() for p in whole)
    assert held["fsdp_sam"] < 0.51 * held["ddp_sam_global"]  # rank 0's shards
    assert "FSDP2 / DDP, median of per-round ratios" in (out / "fsdp_speed_t1.txt").read_text()
    code = main(["bench", "sharded-store", "--worlds", "1", "2", "--store-cases", "1001x7",
                 "--repeats", "2", "--batch-size", "4", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = json.loads((out / "sharded_store_t1.json").read_text())["rows"]
    per_sample = 3 * (7 * 2 + 4)  # Ẽ = 3 slots of float16 rows and int32 epochs
    assert [(r["processes"], r["memory_bytes"]) for r in rows] == [
        (1, {"replicated": 1001 * per_sample, "sharded": 1001 * per_sample}),
        (2, {"replicated": 1001 * per_sample, "sharded": 501 * per_sample}),
    ]
    assert rows[1]["received_bytes_per_call"]["replicated"] == 2 * 2 * 8 + 2 * 4 * (8 + 14)
    capsys.readouterr()
    assert main(["bench", "sharded-store", "--store-cases", "10by3", "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "--store-cases takes NxC pairs")
