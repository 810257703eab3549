import json

import pytest
import torch

from flatmin.bench.accuracy import FINAL_NAME, RunJob, measure_final, plan, run_job, run_study
from flatmin.bench.report import collect, format_section, report, section_rows
from flatmin.bench.studies import Section, Variant, study
from flatmin.train.checkpoint import load_run
from flatmin.train.lock import LOCK_NAME, RunLock
from flatmin.train.loop import Trainer

# Digits (bundled with scikit-learn): 200 samples, one epoch, an MLP — a second per run.
TINY = Section(
    "tiny",
    "digits, 1 epoch",
    dataset="digits",
    model="mlp",
    subset=200,
    epochs=1,
    batch_size=50,
    seeds=(0, 1),
    variants=(Variant.of("sgd"), Variant.of("sam"), Variant.of("not-a-method")),
)


def test_plan_skips_unregistered_methods_and_limits_seeds():
    jobs, missing = plan([TINY], registered={"sgd", "sam"})
    assert missing == ["not-a-method"]
    assert [(j.variant.label, j.seed) for j in jobs] == [
        ("sgd", 0), ("sam", 0), ("sgd", 1), ("sam", 1),
    ]  # fmt: skip
    jobs, _ = plan([TINY], registered={"sgd", "sam"}, seeds=1)
    assert {j.seed for j in jobs} == {0}


def test_presets_pair_every_variant_with_a_baseline_in_its_section():
    for name in ("quick", "full"):
        for section in study(name):
            labels = {v.label for v in section.variants}
            assert len(labels) == len(section.variants)
            assert all(v.baseline in labels for v in section.variants), section.name
            assert len(section.seeds) >= 2
    main = study("quick")[0]
    assert {"sgd", "sam", "asam", "stablesam", "saf", "mesa"} <= {v.method for v in main.variants}
    assert len(main.seeds) >= 5
    with pytest.raises(ValueError, match="valid studies"):
        study("huge")


@pytest.mark.slow
def test_a_study_runs_measures_reports_and_skips_finished_runs(tmp_path):
    jobs, _ = plan([TINY], registered={"sgd", "sam"})
    assert run_study(jobs, tmp_path, threads=1, log=lambda _: None) == 0
    finals = {}
    for job in jobs:
        out = job.directory(tmp_path)
        assert (out / "metrics.jsonl").is_file() and (out / "config.json").is_file()
        finals[job.name] = json.loads((out / FINAL_NAME).read_text())
        assert finals[job.name]["epochs"] == 1
        assert finals[job.name]["measure_samples"] == 200
        assert finals[job.name]["lambda_max"] > 0
        assert "sharpness" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    # A second pass finds every final.json and trains nothing.
    stamps = {j.name: (j.directory(tmp_path) / FINAL_NAME).stat().st_mtime_ns for j in jobs}
    run_study(jobs, tmp_path, threads=1, log=lambda _: None)
    assert stamps == {j.name: (j.directory(tmp_path) / FINAL_NAME).stat().st_mtime_ns for j in jobs}

    rows = section_rows(TINY, collect(tmp_path, [TINY])["tiny"])
    sam = next(r for r in rows if r["variant"] == "sam")
    d = [finals[f"sam-s{s}"]["test_acc"] - finals[f"sgd-s{s}"]["test_acc"] for s in (0, 1)]
    assert sam["diff"]["mean"] == pytest.approx(sum(d) / 2)
    assert sam["n"] == 2 and "diff" not in rows[0]
    text, data = report(tmp_path, [TINY], ["not-a-method"])
    assert "| sam | 2 |" in text and "not-a-method" in text
    assert data["sections"]["tiny"]["rows"][1]["variant"] == "sam"
    assert format_section(TINY, rows).startswith("### digits, 1 epoch")


@pytest.mark.slow
def test_an_interrupted_run_is_continued(tmp_path):
    two = Section("two", "digits, 2 epochs", dataset="digits", model="mlp", subset=200,
                  epochs=2, batch_size=50, seeds=(0,), variants=(Variant.of("sgd"),))  # fmt: skip
    job = RunJob(two, two.variants[0], 0)
    Trainer(job.config(threads=1), job.directory(tmp_path), progress=False).run(stop_after=1)
    result = run_job(job, tmp_path, threads=1)
    assert result["epochs"] == 2
    lines = (job.directory(tmp_path) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_a_finished_run_is_read_not_trained_again(tmp_path):
    job = RunJob(TINY, TINY.variants[0], 0)
    final = job.directory(tmp_path) / FINAL_NAME
    theirs = {"test_acc": 0.5, "written_by": "the other worker"}
    final.parent.mkdir(parents=True)
    final.write_text(json.dumps(theirs))
    assert run_job(job, tmp_path, threads=1) == theirs
    assert json.loads(final.read_text()) == theirs
    assert not (job.directory(tmp_path) / "metrics.jsonl").exists()
    assert not (job.directory(tmp_path) / LOCK_NAME).exists()


def test_a_run_held_by_another_worker_is_left_to_it(tmp_path):
    job = RunJob(TINY, TINY.variants[0], 0)
    with RunLock(job.directory(tmp_path)):  # the other worker
        assert run_job(job, tmp_path, threads=1) is None
    assert not (job.directory(tmp_path) / "metrics.jsonl").exists()


def test_a_diverged_run_is_recorded_without_measures(tmp_path):
    job = RunJob(TINY, TINY.variants[0], 0)
    Trainer(job.config(threads=1), job.directory(tmp_path), progress=False).run()
    run = load_run(job.directory(tmp_path))
    assert measure_final(run.model, run.data)["diverged"] is False
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    measured = measure_final(run.model, run.data)
    assert measured["diverged"] is True
    assert measured["lambda_max"] is None and measured["sam_sharpness"] is None


def test_report_averages_measures_over_the_runs_that_did_not_diverge():
    def final(acc, sharpness, lam, loss, diverged=None):
        run = {"test_acc": acc, "sam_sharpness": sharpness, "lambda_max": lam,
               "train_loss": loss, "train_wall_time": 1.0}  # fmt: skip
        return run if diverged is None else {**run, "diverged": diverged}

    results = {
        "sgd": {0: final(0.8, 0.01, 4.0, 0.5), 1: final(0.7, 0.03, 6.0, 0.7)},
        "sam": {
            0: final(0.9, 0.02, 2.0, 0.4, False),
            1: final(0.1, None, None, float("nan"), True),
        },
    }
    rows = {r["variant"]: r for r in section_rows(TINY, results)}
    assert rows["sgd"]["diverged"] == 0 and rows["sgd"]["lambda_max_mean"] == pytest.approx(5.0)
    sam = rows["sam"]
    assert sam["n"] == 2 and sam["diverged"] == 1
    assert sam["acc_mean"] == pytest.approx(0.5)  # the diverged run's accuracy counts
    assert (sam["sharpness_mean"], sam["lambda_max_mean"]) == (0.02, 2.0)
    assert sam["train_loss_mean"] == 0.4
    text = format_section(TINY, list(rows.values()))
    assert "| sam | 2 (1 diverged) | 50.00 ± 56.57 |" in text
    assert "did not diverge" in text
    results["sam"][0] = final(0.2, None, None, float("nan"), True)
    line = next(x for x in format_section(TINY, section_rows(TINY, results)).splitlines()
                if x.startswith("| sam"))  # fmt: skip
    assert line.endswith("| — | — | — | 1 |")


def test_report_heading_says_when_the_runs_are_shorter_than_the_study():
    """`bench accuracy --epochs 2` runs: the section title's epoch count is not theirs."""

    def final(seed, epochs):
        return {"test_acc": 0.5 + seed / 10, "sam_sharpness": 0.01, "lambda_max": 1.0,
                "train_loss": 0.3, "train_wall_time": 1.0, "epochs": epochs}  # fmt: skip

    short = {"sgd": {0: final(0, 2), 1: final(1, 2)}, "sam": {0: final(0, 2)}}
    heading = format_section(TINY, section_rows(TINY, short)).splitlines()[0]
    assert heading == "### digits, 1 epoch — these runs: 2 epochs, not the study's 1"
    full = {"sgd": {0: final(0, 1), 1: final(1, 1)}}
    assert format_section(TINY, section_rows(TINY, full)).splitlines()[0] == "### digits, 1 epoch"


def test_reused_variant_reads_the_home_section(tmp_path):
    variant = Variant.of("sgd").reused_from("main")
    job = RunJob(TINY, variant, 3)
    assert job.directory(tmp_path) == tmp_path / "main" / "sgd-s3"
    renamed = Variant.of("sgd", "sgd-lr0.1", lr=0.1).reused_from("main", "sgd")
    assert RunJob(TINY, renamed, 2).directory(tmp_path) == tmp_path / "main" / "sgd-s2"
