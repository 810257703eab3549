import json

import pytest

from flatmin.cli import main
from flatmin.cli.bench import MODES, PRESETS
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
    assert [r["store"] for r in speed["12"]["rows"]] == ["full rows", "top_k=3"]
    assert "| top_k=3 |" in (out / "topk_speed_t1.txt").read_text()
    code = main(["bench", "topk-memory", "--memmap-samples", "200", "--out", str(out)])
    assert code == 0
    memory = json.loads((out / "topk_memory.json").read_text())
    assert set(memory["table"]) == {"CIFAR-100", "ImageNet-1k", "ImageNet-21k"}
    assert memory["memmap"]["file_bytes"] == 3 * 200 * 44  # k = 10 of 1000 classes: 44-byte rows
    assert not (out / "topk_memmap_store.bin").exists()
    capsys.readouterr()
    assert main(["bench", "topk-speed", "--samples", "0", "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "--samples must be an integer >= 1, got 0")
