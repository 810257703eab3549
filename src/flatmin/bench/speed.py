"""``flatmin bench speed``: training throughput of every registered method relative to SGD.

For each model (a CIFAR-size ResNet-18 on 3×32×32 inputs, the 28×28 BatchNorm CNN and the
MNIST-1D CNN; :mod:`flatmin.bench.workload`) every registered method gets its own copy
of the same initial weights and its own optimizer, built through the method registry
exactly as ``flatmin train`` builds it, and each training step is
``method.train_step(...)``, the trainer's step. The methods are timed
*interleaved in one process*: round 1 runs one block of every method (A B C …), round 2
again, …, so a change in machine load hits all methods alike. A block is one "epoch" of
``steps`` steps over a synthetic set of ``steps × batch`` samples; the first round is a
warm-up and not counted. Reported per method: the median images/s over the rounds; the
median over rounds of the per-round ratio to SGD (each round's block against the same
round's SGD block) in wall time; the ratio of the fastest blocks (the figure least
disturbed by other work on a shared machine); and the same median ratio in *process CPU
time* (``time.process_time``, all threads), which measures the work a method does rather
than the share of a contended CPU it got. The target verdicts use the wall-time median
ratio and the CPU-time one; on a machine shared with other jobs, trust the CPU-time one.

Every method runs in its steady state: SAF and MESA start their term at once
(``start_epoch = 0``) and SAF's store is filled for ``Ẽ`` epochs before timing, so every
timed step reads a target, computes the KL and records the batch; MESA's teacher runs its
forward pass and EMA update in every timed step; LookSAM's blocks hold whole periods of
``k`` steps where possible.

Extra memory is *counted from tensor sizes*, not measured: ``Method.extra_memory_bytes``
(SAM family: the copy of ``w`` kept between the passes; SAF: its logit store for the
real dataset's number of samples — 50,000 for the CIFAR-size model, 60,000 for
Fashion-MNIST, 4,000 for MNIST-1D; MESA: its EMA teacher). Optimizer state that the base
optimizer keeps anyway (momentum) is not counted.

``--profile METHOD`` adds a torch.profiler table of one block of that method (and of
SGD) to the output, to see where a method's extra time goes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from flatmin.bench.memory import peak_rss_bytes
from flatmin.bench.stats import median
from flatmin.bench.workload import CASES, MethodRunner, SpeedCase
from flatmin.optim._checks import check_int
from flatmin.train.models import build_model
from flatmin.train.registry import METHODS

# The SAF paper's throughput as a share of the base optimizer's (Du et al., NeurIPS 2022:
# ImageNet, ResNet-50, and ViT-S/32 for LookSAM), and issue 8's targets for ours.
PAPER_RATIO = {
    "sam": 0.493,
    "gsam": 0.481,
    "esam": 0.637,
    "looksam": 0.829,
    "saf": 0.991,
    "mesa": 0.852,
}
TARGET_RATIO = {"saf": 0.99, "mesa": 0.87, "sam": 0.495, "looksam": 0.80, "esam": 0.60}


@dataclass
class SpeedRow:
    """One method's result on one case."""

    case: str
    method: str
    images_per_s: float  # median over the rounds (wall time)
    median_round_ratio: float  # median over rounds of (this block / same round's SGD block)
    best_block_ratio: float  # fastest block / SGD's fastest block
    cpu_round_ratio: float  # as median_round_ratio, in images per process-CPU second
    extra_memory_bytes: int
    parameter_bytes: int
    blocks: list[float]  # images/s (wall) of every counted block
    cpu_blocks: list[float]  # images per CPU second of every counted block
    measured_extra_bytes: int | None = None  # peak RSS minus SGD's (flatmin.bench.memory)


def measure_case(
    case: SpeedCase,
    methods: Sequence[str],
    repeats: int,
    log: Callable[[str], None] | None = None,
) -> list[SpeedRow]:
    """Time ``methods`` (``"sgd"`` first) interleaved: one warm-up round, then ``repeats``
    counted rounds. Returns one row per method."""
    if "sgd" not in methods:
        raise ValueError("the speed benchmark needs 'sgd' among the methods (it is the baseline)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    torch.manual_seed(0)
    base = build_model(case.model, case.num_classes, case.input_shape)
    runners = [MethodRunner(case, name, base) for name in methods]
    for runner in runners:  # warm-up round (allocations, first-call overheads)
        runner.block()
    walls: dict[str, list[float]] = {name: [] for name in methods}
    cpus: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(repeats):
        for runner in runners:
            wall, cpu = runner.block()
            walls[runner.name].append(wall)
            cpus[runner.name].append(cpu)
        if log is not None:
            log(
                f"{case.name} round {r + 1}/{repeats}: "
                + "  ".join(f"{n} {walls[n][-1]:.0f}" for n in methods)
            )
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    rows = []
    for runner in runners:
        name = runner.name
        rows.append(
            SpeedRow(
                case=case.name,
                method=name,
                images_per_s=median(walls[name]),
                median_round_ratio=_round_ratio(walls[name], walls["sgd"]),
                best_block_ratio=max(walls[name]) / max(walls["sgd"]),
                cpu_round_ratio=_round_ratio(cpus[name], cpus["sgd"]),
                extra_memory_bytes=runner.extra_memory_bytes(),
                parameter_bytes=param_bytes,
                blocks=walls[name],
                cpu_blocks=cpus[name],
            )
        )
    return rows


def measure_memory(case: SpeedCase, rows: Sequence[SpeedRow]) -> None:
    """Fill each row's ``measured_extra_bytes``: its method's peak resident memory in a
    process of its own (median of three processes), minus SGD's (:mod:`flatmin.bench.memory`)."""
    peaks = {r.method: peak_rss_bytes(case, r.method, repeats=3) for r in rows}
    for r in rows:
        r.measured_extra_bytes = peaks[r.method] - peaks["sgd"]


def _round_ratio(own: Sequence[float], sgd: Sequence[float]) -> float:
    return median([a / b for a, b in zip(own, sgd, strict=True)])


def profile_block(case: SpeedCase, method: str, rows: int = 15) -> str:
    """torch.profiler's table (top ``rows`` ops by self CPU time) of one block of
    ``method`` after a warm-up block."""
    torch.manual_seed(0)
    runner = MethodRunner(case, method, build_model(case.model, case.num_classes, case.input_shape))
    runner.block()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.block()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_table(rows: Sequence[SpeedRow]) -> str:
    """Markdown table: throughput, ratios to SGD, the paper's ratio and the target."""
    lines = [
        "| model | method | images/s (median) | × SGD wall (median of rounds) | × SGD wall "
        "(best blocks) | × SGD CPU time (median of rounds) | paper × base | target: wall / "
        "CPU | extra memory MiB (× params), counted | peak extra MiB, measured |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        paper = f"{100 * PAPER_RATIO[r.method]:.1f} %" if r.method in PAPER_RATIO else "—"
        target = TARGET_RATIO.get(r.method)
        verdict = "—"
        if target is not None:
            ratios = (r.median_round_ratio, r.cpu_round_ratio)
            marks = ["met" if x >= target else "MISSED" for x in ratios]
            verdict = f"≥ {100 * target:.1f} %: {marks[0]} / {marks[1]}"
        lines.append(
            f"| {r.case} | {r.method} | {r.images_per_s:.0f} | {100 * r.median_round_ratio:.1f} % "
            f"| {100 * r.best_block_ratio:.1f} % | {100 * r.cpu_round_ratio:.1f} % | {paper} "
            f"| {verdict} "
            f"| {_mib(r.extra_memory_bytes)} ({r.extra_memory_bytes / r.parameter_bytes:.2f}×) "
            f"| {'—' if r.measured_extra_bytes is None else _mib(r.measured_extra_bytes)} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_start": os.getloadavg(),
    }


def results_header(command: str, threads: bool = True) -> str:
    """The two comment lines that open a raw results file: the command, then the time,
    torch, this process's thread count (``threads``; off where each process sets its
    own), the CPU count and the load average."""
    info = machine()
    thread_part = f"{info['torch_threads']} thread(s), " if threads else ""
    return (
        f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, torch {info['torch']}, "
        f"{thread_part}{info['cpu_count']} CPUs, load average {info['loadavg_start']}"
    )


def run_speed(
    models: Sequence[str],
    methods: Sequence[str] | None = None,
    *,
    repeats: int = 5,
    steps: int | None = None,
    batch_size: int | None = None,
    profile_method: str | None = None,
    channels_last_inputs: bool = False,
    measure_peak_memory: bool = False,
    command: str = "flatmin bench speed",
    log: Callable[[str], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Time ``methods`` (default: every registered one; SGD always) on the ``models`` of
    :data:`~flatmin.bench.workload.CASES`; returns the report's text and its data.

    ``steps``/``batch_size`` override each case's block; ``ValueError`` for an unknown
    name or a count below 1.
    """
    check_int("repeats", repeats, minimum=1)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is not None:
            check_int(name, value, minimum=1)
    unknown = sorted(set(models) - set(CASES)) + sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown models or methods {unknown}")
    chosen = list(methods or METHODS)
    chosen = ["sgd", *[m for m in chosen if m != "sgd"]]
    info = machine()
    started = time.perf_counter()
    rows: list[SpeedRow] = []
    profiles: dict[str, str] = {}
    cases = []
    for key in models:
        overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size))
                     if v is not None}  # fmt: skip
        case = replace(CASES[key], channels_last_inputs=channels_last_inputs, **overrides)
        cases.append(case)
        case_rows = measure_case(case, chosen, repeats, log=log)
        if measure_peak_memory:
            measure_memory(case, case_rows)
        rows += case_rows
        if profile_method:
            for name in ("sgd", profile_method):
                profiles[f"{case.name}/{name}"] = profile_block(case, name)
    wall = time.perf_counter() - started
    info["loadavg_end"] = os.getloadavg()
    text = "\n".join(
        [
            f"# {command}",
            f"# machine: {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
            f"torch {info['torch']}, load average at start {info['loadavg_start']}, "
            f"at end {info['loadavg_end']}; wall time {wall:.0f} s",
            f"# {repeats} counted rounds after a warm-up round; image batches "
            f"{'channels_last' if channels_last_inputs else 'NCHW'}; block = steps × batch: "
            + ", ".join(f"{c.name} {c.steps}×{c.batch_size}" for c in cases),
            "",
            format_table(rows),
            "",
            "Counted extra memory: from tensor sizes (Method.extra_memory_bytes). Measured: "
            "peak resident memory of a process training the method minus SGD's "
            "(--measure-memory, median of 3 processes).",
            *[f"\n## profile {name}\n{table}" for name, table in profiles.items()],
        ]
    )
    data = {"command": command, "machine": info, "wall_time": wall,
            "rows": [asdict(r) for r in rows]}  # fmt: skip
    return text, data


def write_speed(out: Path, text: str, data: dict[str, Any], stem: str) -> Path:
    """``OUT/STEM.txt`` and ``OUT/STEM.json``; returns the text file's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.txt").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    return out / f"{stem}.txt"
