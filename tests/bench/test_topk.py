import json
import math

import pytest
import torch

from flatmin.bench.accuracy import plan, run_study
from flatmin.bench.report import report
from flatmin.bench.studies import Section, Variant
from flatmin.bench.topk import (
    format_memory,
    gradient_errors,
    memmap_store,
    memory_table,
    store_speed,
)
from flatmin.train.checkpoint import load_run
from flatmin.train.loop import first_samples
from flatmin.trajectory import _topk_compiled
from flatmin.trajectory.kl import tempered_kl

SAF = {"start_epoch": 0, "lag_epochs": 1}
# Digits (10 classes), 200 samples, 3 epochs; SAF's term from the second epoch.
TOPK = Section(
    "topk",
    "digits, top-k",
    dataset="digits",
    model="mlp",
    subset=200,
    epochs=4,
    batch_size=50,
    seeds=(0, 1),
    track_sharpness=False,
    variants=(
        Variant.of("saf", **SAF),
        Variant.of("saf", "saf-top2", baseline="saf", top_k=2, **SAF),
        Variant.of("saf", "saf-top10", baseline="saf", top_k=10, **SAF),
    ),
    top_k_gradient=(1, 2, 10),
)


@pytest.mark.slow
def test_a_top_k_section_reports_the_smallest_k_and_the_gradient_error(tmp_path):
    jobs, _ = plan([TOPK], registered={"saf"})
    run_study(jobs, tmp_path, threads=1, log=lambda _: None)
    text, data = report(tmp_path, [TOPK], [])
    summary = data["sections"]["topk"]["top_k"]
    rows = {r["variant"]: r for r in data["sections"]["topk"]["rows"]}
    full = rows["saf"]
    # k = C is the full term up to float round-off: the same run to the last digits.
    assert rows["saf-top10"]["acc_mean"] == pytest.approx(full["acc_mean"], abs=0.011)
    expected_within = {
        k: abs(rows[f"saf-top{k}"]["acc_mean"] - full["acc_mean"]) <= full["acc_std"]
        for k in (2, 10)
    }
    assert summary["within"] == expected_within
    smallest = min(k for k, ok in expected_within.items() if ok)
    assert summary["smallest_k_within_spread"] == smallest
    assert f"k = {smallest}" in text
    for point in ("halfway", "end"):
        errors = [summary["gradient"][str(k)][point] for k in (1, 2, 10)]
        ratios = [e["term_ratio"] for e in errors]
        assert ratios[0] <= ratios[1] <= ratios[2] + 1e-6  # a finer grouping keeps more
        assert ratios[2] == pytest.approx(1.0, abs=1e-4)
        assert errors[2]["logit_gradient_error"] < 1e-3 < errors[0]["logit_gradient_error"]
    assert (tmp_path / "topk" / "saf-s0-midway" / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_gradient_errors_are_those_of_the_stored_targets(tmp_path):
    jobs, _ = plan([TOPK], registered={"saf"}, seeds=1)
    run_study(jobs[:1], tmp_path, threads=1, log=lambda _: None)
    run_dir = jobs[0].directory(tmp_path)
    found = gradient_errors(run_dir, (3,))
    # Recompute the term ratio from the checkpoint by hand: rows of epoch − Ẽ, the model's
    # logits on the 200 training samples.
    run = load_run(run_dir)
    saf = run.checkpoint["method_state"]["saf"]
    epoch = saf["epoch"] + 1
    targets = saf["store"]["logits"][epoch % 1].double()
    assert torch.all(saf["store"]["written_epoch"][0] == epoch - 1)
    with torch.no_grad():
        z = run.model(first_samples(run.data.train, 200)[0]).double()
    full = tempered_kl(z, targets, 5.0)
    classes = targets.topk(3, dim=1).indices
    p = torch.softmax(targets / 5, 1)
    q = torch.softmax(z / 5, 1)
    mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, classes, True)
    r, big_q = (p * ~mask).sum(1), (q * ~mask).sum(1)
    bucketed = ((p * (p / q).log() * mask).sum(1) + r * (r / big_q).log()).mean() * 25
    assert found["epoch"] == epoch and found["valid_rows"] == 200
    assert math.isclose(found["by_k"]["3"]["term_ratio"], float(bucketed / full), rel_tol=1e-4)
    assert json.loads((run_dir / "topk_gradient.json").read_text()) == found


def test_memory_table_is_memory_bytes_of_stores_that_allocate_nothing():
    table = memory_table(ks=(5,), lag=3, datasets={"ImageNet-21k": (14_197_122, 21_841)})
    entry = table["ImageNet-21k"]
    n, c = 14_197_122, 21_841
    assert entry["full_float16"] == n * c * 3 * 2 + n * 3 * 4  # 1.86 TB, as the issue says
    assert entry["paper_float32"] == n * c * 4 * 4
    # 4 (rest_lse) + 5·2 (float16) + 5·2 (int16 classes) = 24 bytes, + 4 for the epoch
    assert entry["top_k=5"] == n * 3 * (24 + 4)
    assert "ImageNet-21k (14,197,122 × 21,841)" in format_memory(table, (5,), 3)


def test_memmap_store_counts_the_file_and_deletes_it(tmp_path):
    path = tmp_path / "store.bin"
    found = memmap_store(path, samples=300, classes=50, k=4, lag=2, batch=64)
    row_bytes = 4 + 4 * 2 + 4 * 1  # rest_lse, float16 values, uint8 classes: 16
    assert found["file_bytes"] == 2 * 300 * row_bytes == found["table_bytes"]
    assert found["memory_bytes"] == found["table_bytes"] + 2 * 300 * 4
    assert found["slots_written"] == 2 * 300
    assert not path.exists()


def test_store_speed_times_every_store_against_full_rows():
    switch = _topk_compiled.ENABLED
    result = store_speed(classes=(12,), ks=(3, 20), batch=16, samples=64, repeats=2, lag=1,
                         log=lambda _: None)["12"]  # fmt: skip
    labels = [r["store"] for r in result["rows"]]
    # k = 20 > C is left out; the compiled loops run only with numba
    compiled = ["top_k=3"] if _topk_compiled.ENABLED else []
    assert labels == ["full rows", *compiled, "top_k=3, eager"]
    assert _topk_compiled.ENABLED == switch  # each store's path was set and restored
    assert [r["compiled"] for r in result["rows"][1:]] == [True] * len(compiled) + [False]
    full, top = result["rows"][0], result["rows"][-1]
    assert full["wall_ratio"] == 1.0 and top["wall_ratio"] > 0
    assert (full["row_bytes"], top["row_bytes"]) == (24, 16)  # 4 + 3·2 + 3·1, to 4 bytes
    assert top["bytes_per_step"] == 2 * 16 * (16 + 4)
