"""``flatmin bench topk``: SAF's compressed store (``top_k``) against full rows.

**Speed** (:func:`store_speed`). For each number of classes ``C`` one SAF with full rows
and, per ``k``, one ``SAF(..., top_k=k)`` running the compiled loops (when numba is
installed) and one running the eager torch code are built over the same ``N`` samples and
filled
for ``Ẽ`` epochs; then they are timed *interleaved in one process*: each round runs one
epoch of every store (the order rotates from round to round), over the same batches of
the same fixed logits, each step being what SAF costs a training step — the look-up and
record (``saf(logits, idx)``) and the term's backward. The first round is a warm-up.
Reported per store: the median over rounds of the per-round ratio of its epoch time to the
full store's (wall clock, and thread CPU time, which a contended CPU disturbs less), the
range of those ratios, the full store's time per step, and the store bytes a step moves
(each row and its epoch stamp read once and written once: ``2·B·(row bytes + 4)``).

**Memory** (:func:`memory_table`). ``memory_bytes`` of stores built on the ``meta``
device (nothing is allocated) for CIFAR-100, ImageNet-1k and ImageNet-21k: full float16
rows, the SAF paper's layout (``Ẽ + 1`` float32 slots, no bookkeeping) and ``top_k`` for
each ``k``.

**A memory-mapped store on disk** (:func:`memmap_store`): a ``top_k`` store of synthetic
logits, every slot written, flushed; the file's size and the disk blocks it occupies
against ``memory_bytes``. The file is deleted afterwards.

**The gradient's error on real logits** (:func:`gradient_errors`, for the accuracy
study's top-k sections): on a full-row SAF run's final checkpoint, the targets the next
epoch would read (the store's rows of ``Ẽ`` epochs back) and the model's logits on the
training set give the full term and, with each target compressed to its top ``k``, the
bucketed one; reported are ``KL_k/KL`` and the relative error of the gradient with respect
to the logits and to the weights, ``‖∇_k − ∇‖/‖∇‖``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flatmin.bench.accuracy import FINAL_NAME, RunJob
from flatmin.bench.stats import median, summarize
from flatmin.bench.studies import Section
from flatmin.optim._checks import check_int
from flatmin.train.checkpoint import load_run, write_json
from flatmin.train.loop import Trainer, first_samples
from flatmin.trajectory import _topk_compiled
from flatmin.trajectory.kl import bucketed_tempered_kl, tempered_kl
from flatmin.trajectory.logit_store import LogitStore
from flatmin.trajectory.saf import SAF

DATASETS = {  # name: (training samples, classes)
    "CIFAR-100": (50_000, 100),
    "ImageNet-1k": (1_281_167, 1000),
    "ImageNet-21k": (14_197_122, 21_841),
}
TAU = 5.0


Variant = tuple[int | None, bool]
"""A store timed: ``(k, compiled)``; ``(None, False)`` is full rows."""
FULL: Variant = (None, False)


def _variants(num_classes: int, ks: Sequence[int]) -> list[Variant]:
    """Full rows, then per ``k`` the compiled top-k code (with numba) and the eager one."""
    paths = [True, False] if _topk_compiled.ENABLED else [False]
    kept = sorted({k for k in ks if k <= num_classes})
    return [FULL, *[(k, compiled) for k in kept for compiled in paths]]


def _label(variant: Variant) -> str:
    k, compiled = variant
    if k is None:
        return "full rows"
    return f"top_k={k}" if compiled else f"top_k={k}, eager"


def _row_bytes(saf: SAF) -> int:
    table = saf.store.table
    return table.shape[2] * table.element_size()


class _Stores:
    """The stores of one ``C``, each at its own epoch, run over shared batches."""

    def __init__(self, logits: torch.Tensor, variants: list[Variant], lag: int) -> None:
        samples, classes = logits.shape
        self.logits = logits
        self.stores = {
            v: SAF(samples, classes, lag_epochs=lag, start_epoch=0, top_k=v[0]) for v in variants
        }
        self.epochs = dict.fromkeys(variants, 0)

    def batches(self, batch: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches ``(indices, logits)``, in a new random order."""
        samples = self.logits.shape[0]
        order = torch.randperm(samples, generator=gen)[: samples // batch * batch]
        return [(idx, self.logits[idx]) for idx in order.split(batch)]

    def epoch(self, variant: Variant, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        """One epoch of a store: look-up, record and the term's backward per batch;
        returns its (wall, thread CPU) seconds."""
        saf = self.stores[variant]
        saf.set_epoch(self.epochs[variant])
        self.epochs[variant] += 1
        enabled = _topk_compiled.ENABLED
        _topk_compiled.ENABLED = variant[1]
        try:
            wall, cpu = time.perf_counter(), time.thread_time()
            for idx, rows in batches:
                saf(rows.detach().requires_grad_(), idx).backward()
            return time.perf_counter() - wall, time.thread_time() - cpu
        finally:
            _topk_compiled.ENABLED = enabled


def store_speed(
    classes: Sequence[int] = (10, 100, 1000),
    ks: Sequence[int] = (1, 5, 10, 20),
    *,
    batch: int = 128,
    samples: int = 10_240,
    repeats: int = 9,
    lag: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time full and ``top_k`` stores side by side (see the module docstring); returns
    per ``C`` the rows of its table (:func:`format_speed`)."""
    batch = check_int("batch", batch, minimum=1)
    samples = check_int("samples", samples, minimum=batch)
    repeats = check_int("repeats", repeats, minimum=1)
    gen = torch.Generator().manual_seed(seed)
    results: dict[str, Any] = {}
    for num_classes in classes:
        variants = _variants(num_classes, ks)
        runs = _Stores(torch.randn(samples, num_classes, generator=gen) * 3, variants, lag)
        for _ in range(lag):  # fill every slot: the timed epochs read valid targets
            batches = runs.batches(batch, gen)
            for v in variants:
                runs.epoch(v, batches)
        times: dict[Variant, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(repeats + 1):
            batches = runs.batches(batch, gen)
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                measured = runs.epoch(v, batches)
                if r:  # round 0 warms up
                    times[v].append(measured)
        steps = samples // batch
        rows = []
        for v in variants:
            wall = [a / b for (a, _), (b, _) in zip(times[v], times[FULL], strict=True)]
            cpu = [a / b for (_, a), (_, b) in zip(times[v], times[FULL], strict=True)]
            saf = runs.stores[v]
            rows.append({
                "store": _label(v),
                "top_k": v[0],
                "compiled": v[1],
                "us_per_step": 1e6 * median([t for t, _ in times[v]]) / steps,
                "wall_ratio": median(wall),
                "wall_ratio_range": [min(wall), max(wall)],
                "cpu_ratio": median(cpu),
                "row_bytes": _row_bytes(saf),
                "bytes_per_step": 2 * batch * (_row_bytes(saf) + 4),
                "memory_bytes": saf.memory_bytes,
            })  # fmt: skip
        results[str(num_classes)] = {"samples": samples, "batch": batch, "rows": rows}
        log(format_speed(num_classes, results[str(num_classes)]))
    return results


def format_speed(num_classes: int, result: dict[str, Any]) -> str:
    lines = [
        f"C = {num_classes}, N = {result['samples']:,}, batch {result['batch']}:",
        "| store | µs/step (median) | × full rows, wall (min–max) | × full rows, thread CPU "
        "| row bytes | store bytes moved/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        low, high = r["wall_ratio_range"]
        lines.append(
            f"| {r['store']} | {r['us_per_step']:.0f} | {r['wall_ratio']:.3f} "
            f"({low:.3f}–{high:.3f}) | {r['cpu_ratio']:.3f} | {r['row_bytes']} "
            f"| {r['bytes_per_step']:,} |"
        )
    return "\n".join(lines)


def memory_table(
    ks: Sequence[int] = (5, 10, 20), lag: int = 3, datasets: dict[str, tuple[int, int]] = DATASETS
) -> dict[str, Any]:
    """``memory_bytes`` per dataset and layout, from stores on the ``meta`` device."""
    table = {}
    for name, (samples, classes) in datasets.items():
        paper = LogitStore(samples, classes, lag + 1, dtype=torch.float32, device="meta")
        entry = {
            "samples": samples,
            "classes": classes,
            "paper_float32": paper.table.numel() * paper.table.element_size(),
            "full_float16": SAF(samples, classes, lag_epochs=lag, device="meta").memory_bytes,
        }
        for k in ks:
            saf = SAF(samples, classes, lag_epochs=lag, device="meta", top_k=k)
            entry[f"top_k={k}"] = saf.memory_bytes
        table[name] = entry
    return table


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def format_memory(table: dict[str, Any], ks: Sequence[int], lag: int) -> str:
    head = ["dataset (N × C)", f"paper: Ẽ+1 = {lag + 1} float32 slots", f"full float16, Ẽ = {lag}"]
    head += [f"top_k = {k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in table.items():
        full = e["full_float16"]
        cells = [f"{name} ({e['samples']:,} × {e['classes']:,})", _size(e["paper_float32"]),
                 _size(full)]  # fmt: skip
        cells += [f"{_size(e[f'top_k={k}'])} ({e[f'top_k={k}'] / full:.2%})" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memmap_store(
    path: Path,
    samples: int = 1_000_000,
    classes: int = 1000,
    k: int = 10,
    lag: int = 3,
    batch: int = 8192,
    seed: int = 0,
) -> dict[str, Any]:
    """Fill a memory-mapped ``top_k`` store at ``path`` (every slot of every sample) with
    synthetic logits, flush it, and compare the file with ``memory_bytes``; the file is
    deleted afterwards."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; the benchmark creates (and deletes) it")
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    saf = SAF(samples, classes, lag_epochs=lag, start_epoch=lag, top_k=k, memmap_path=path)
    try:
        for epoch in range(lag):
            saf.set_epoch(epoch)
            for idx in torch.randperm(samples, generator=gen).split(batch):
                saf.lookup(torch.randn(len(idx), classes, generator=gen) * 3, idx)
        saf.store.flush()
        stat = os.stat(path)
        table_bytes = saf.store.table.numel()
        written = int((saf.store.written_epoch >= 0).sum())
        result = {
            "samples": samples,
            "classes": classes,
            "top_k": k,
            "lag": lag,
            "memory_bytes": saf.memory_bytes,
            "table_bytes": table_bytes,
            "epoch_bytes_in_memory": saf.memory_bytes - table_bytes,
            "file_bytes": stat.st_size,
            "disk_blocks_bytes": stat.st_blocks * 512,
            "slots_written": written,
            "full_float16_bytes": SAF(samples, classes, lag_epochs=lag, device="meta").memory_bytes,
            "seconds": time.perf_counter() - started,
        }
    finally:
        del saf
        path.unlink(missing_ok=True)
    return result


def format_memmap(result: dict[str, Any]) -> str:
    r = result
    return (
        f"memory-mapped top_k={r['top_k']} store, {r['samples']:,} samples × {r['classes']:,} "
        f"classes, Ẽ = {r['lag']} ({r['slots_written']:,} slots written): file "
        f"{r['file_bytes']:,} bytes ({r['disk_blocks_bytes']:,} on disk), table counted by "
        f"memory_bytes {r['table_bytes']:,} bytes + epochs in memory "
        f"{r['epoch_bytes_in_memory']:,} = {r['memory_bytes']:,} ({_size(r['memory_bytes'])});"
        f" full float16 rows would take {r['full_float16_bytes']:,} "
        f"({_size(r['full_float16_bytes'])}); {r['seconds']:.0f} s"
    )


# --- the accuracy study's top-k sections ------------------------------------------------

GRADIENT_NAME = "topk_gradient.json"


def compress(targets: torch.Tensor, k: int, tau: float):
    """``(top logits, classes, rest_lse)`` of full target rows, as a top-``k`` store keeps
    them (here from the rows given, e.g. the float16 rows of a full store)."""
    top, classes = targets.topk(k, dim=1)
    if k < targets.shape[1]:
        rest = (targets / tau).scatter(1, classes, float("-inf")).logsumexp(dim=1)
    else:
        rest = targets.new_full((targets.shape[0],), float("-inf"))
    return top, classes, rest


def gradient_errors(run_dir: Path, ks: Sequence[int]) -> dict[str, Any]:
    """The bucketed term against the full one on a full-row SAF run's last logits (see the
    module docstring); cached in ``RUN_DIR/topk_gradient.json``."""
    path = Path(run_dir) / GRADIENT_NAME
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("ks") == list(ks):
            return cached
    run = load_run(run_dir)
    saf = run.checkpoint["method_state"]["saf"]
    if saf.get("top_k") is not None:
        raise ValueError(f"{run_dir} is a top_k={saf['top_k']} run; expected full rows")
    lag, tau, lam = int(saf["lag_epochs"]), float(saf["tau"]), float(saf["lam"])
    epoch = int(saf["epoch"]) + 1  # the next epoch reads the rows of epoch − Ẽ
    slot = epoch % lag
    targets = saf["store"]["logits"][slot].double()
    valid = saf["store"]["written_epoch"][slot] == epoch - lag
    x, _ = first_samples(run.data.train, len(run.data.train))
    params = [p for p in run.model.parameters() if p.requires_grad]
    logits = run.model(x).double()  # the terms in float64: their difference, not round-off

    def gradients(term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        by_logits, *by_weights = torch.autograd.grad(term, [logits, *params], retain_graph=True)
        return by_logits, torch.cat([g.flatten() for g in by_weights])

    full = tempered_kl(logits, targets, tau, valid, weight=lam)
    full_logits, full_weights = gradients(full)
    result: dict[str, Any] = {
        "ks": list(ks),
        "epoch": epoch,
        "valid_rows": int(valid.sum()),
        "rows": int(valid.numel()),
        "full_term": full.item(),
        "by_k": {},
    }
    for k in ks:
        term = bucketed_tempered_kl(logits, *compress(targets, k, tau), tau, valid, weight=lam)
        by_logits, by_weights = gradients(term)
        result["by_k"][str(k)] = {
            "term_ratio": (term / full).item(),
            "logit_gradient_error": float((by_logits - full_logits).norm() / full_logits.norm()),
            "weight_gradient_error": float(
                (by_weights - full_weights).norm() / full_weights.norm()
            ),
        }
    write_json(path, result)
    return result


def _midway_run(job: RunJob, root: Path) -> Path:
    """The run of ``job`` stopped halfway (re-trained from its seed: the trainer is
    deterministic, so these are the weights and store the full run had then)."""
    out = root / job.section.name / f"{job.name}-midway"
    if not (out / "checkpoint.pt").is_file():
        config = job.config(threads=1)
        Trainer(config, out, progress=False, lock=False).run(stop_after=config.epochs // 2)
    return out


def top_k_summary(
    section: Section, rows: Sequence[Mapping[str, Any]], root: Path
) -> tuple[str, dict[str, Any]]:
    """The smallest ``k`` whose accuracy is within the full store's seed spread, and the
    gradient errors on the full store's finished seeds, halfway and at the end (means
    over seeds): text and JSON. The halfway runs are trained here if missing."""
    by_label = {r["variant"]: r for r in rows}
    full = by_label.get("saf")
    if full is None:
        return "", {}
    within = {}
    for k in section.top_k_gradient:
        row = by_label.get(f"saf-top{k}")
        if row is not None:
            within[k] = abs(row["acc_mean"] - full["acc_mean"]) <= full["acc_std"]
    smallest = min((k for k, ok in within.items() if ok), default=None)
    lines = [
        f"Smallest k whose mean accuracy is within the full store's seed spread "
        f"({100 * full['acc_mean']:.2f} ± {100 * full['acc_std']:.2f} %): "
        + ("none" if smallest is None else f"k = {smallest}")
        + " (within: "
        + ", ".join(f"k={k} {'yes' if ok else 'no'}" for k, ok in within.items())
        + ")."
    ]
    summary: dict[str, Any] = {"smallest_k_within_spread": smallest, "within": within}
    variant = next(v for v in section.variants if v.label == "saf")
    jobs = [RunJob(section, variant, seed) for seed in section.seeds]
    jobs = [job for job in jobs if (job.directory(root) / FINAL_NAME).is_file()]
    if not jobs:
        return "\n".join(lines), summary
    ks = section.top_k_gradient
    points = {
        "halfway": [gradient_errors(_midway_run(job, root), ks) for job in jobs],
        "end": [gradient_errors(job.directory(root), ks) for job in jobs],
    }
    first = points["end"][0]
    lines += [
        "",
        f"The term against full rows on the full store's own logits and targets ({len(jobs)} "
        f"seeds, means; {first['valid_rows']:,} of {first['rows']:,} training rows with a "
        f"target; halfway = epoch {points['halfway'][0]['epoch']}, end = epoch "
        f"{first['epoch']}; ∇_z: gradient with respect to the logits, ∇_w: to the weights):",
        "",
        "| k | KL_k/KL halfway | ‖Δ∇_z‖/‖∇_z‖ halfway | ‖Δ∇_w‖/‖∇_w‖ halfway "
        "| KL_k/KL end | ‖Δ∇_z‖/‖∇_z‖ end | ‖Δ∇_w‖/‖∇_w‖ end |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ("term_ratio", "logit_gradient_error", "weight_gradient_error")
    summary["gradient"] = {}
    for k in ks:
        means = {
            point: {key: summarize([e["by_k"][str(k)][key] for e in found]).mean for key in keys}
            for point, found in points.items()
        }
        summary["gradient"][str(k)] = means
        cells = [f"{means[point][key]:.3f}" for point in points for key in keys]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    summary["full_term"] = {
        point: summarize([e["full_term"] for e in found]).mean for point, found in points.items()
    }
    return "\n".join(lines), summary
