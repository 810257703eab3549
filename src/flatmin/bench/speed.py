"""``flatmin bench speed``: training throughput of every registered method relative to SGD.

For each model (a CIFAR-size ResNet-18 on 3×32×32 inputs, the 28×28 BatchNorm CNN and the
MNIST-1D CNN; synthetic inputs and labels — speed does not depend on the values) every
registered method gets its own copy of the same initial weights and its own optimizer,
built through the method registry exactly as ``flatmin train`` builds it, and each
training step is ``method.train_step(...)``, the trainer's step. The methods are timed
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

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DESCRIPTION = "images/s of every registered method relative to SGD, interleaved in one process"

# The SAF paper's throughput as a share of the base optimizer's (ImageNet ResNet-50 /
# ViT-S/32 for LookSAM; REFERENCE.md), and issue 8's targets for ours.
PAPER_RATIO = {
    "sam": 0.493,
    "gsam": 0.481,
    "esam": 0.637,
    "looksam": 0.829,
    "saf": 0.991,
    "mesa": 0.852,
}
TARGET_RATIO = {"saf": 0.99, "mesa": 0.87, "sam": 0.495, "looksam": 0.80, "esam": 0.60}


@dataclass(frozen=True)
class SpeedCase:
    """A model on synthetic data: ``num_samples`` is the real dataset's size (it sizes
    SAF's store); a timed block is ``steps`` steps of ``batch_size``."""

    name: str
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_samples: int
    batch_size: int
    steps: int
    channels_last_inputs: bool = False  # 4-D batches in channels_last, weights as built


CASES = {
    "resnet18": SpeedCase("resnet18-cifar", "resnet18", (3, 32, 32), 10, 50_000, 32, 5),
    "cnn": SpeedCase("cnn-28x28", "cnn", (1, 28, 28), 10, 60_000, 128, 10),
    "cnn1d": SpeedCase("cnn1d-mnist1d", "cnn1d", (1, 40), 10, 4_000, 128, 20),
}


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


class MethodRunner:
    """One method training its own copy of the model, a block (epoch) at a time."""

    def __init__(self, case: SpeedCase, method_name: str, base_model: nn.Module) -> None:
        from flatmin.train.registry import MethodContext, get_method

        spec = get_method(method_name)
        self.name = method_name
        self.case = case
        self.model = copy.deepcopy(base_model).train()
        given = {
            h.name: 0
            for h in spec.hyperparameters
            if h.name == "start_epoch"  # SAF/MESA: the term is on in every timed block
        }
        context = MethodContext(num_samples=case.num_samples, num_classes=case.num_classes)
        self.method = spec.create(self.model, given, context)
        self.criterion = nn.CrossEntropyLoss(reduction="none")  # per sample, as the trainer
        generator = torch.Generator().manual_seed(0)
        n = case.steps * case.batch_size
        self.x = torch.randn((n, *case.input_shape), generator=generator)
        self.y = torch.randint(0, case.num_classes, (n,), generator=generator)
        if case.channels_last_inputs and self.x.dim() == 4:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.epoch = 0
        lag = int(spec.resolve(given).get("lag_epochs", 0))
        for _ in range(lag):  # fill SAF's store so that timed steps find their targets
            self.block()

    def block(self) -> tuple[float, float]:
        """One epoch over the synthetic set; returns images per wall second and per
        process-CPU second."""
        self.method.set_epoch(self.epoch)
        b = self.case.batch_size
        started, cpu_started = time.perf_counter(), time.process_time()
        for step in range(self.case.steps):
            index = torch.arange(step * b, (step + 1) * b)
            self.method.train_step(self.model, self.x[index], self.y[index], index, self.criterion)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        self.epoch += 1
        images = self.case.steps * b
        return images / elapsed, images / max(cpu, 1e-9)

    def extra_memory_bytes(self) -> int:
        return int(self.method.extra_memory_bytes(self.model))


def _median(values: Sequence[float]) -> float:
    from flatmin.bench.stats import median

    return median(values)


def measure_case(
    case: SpeedCase,
    methods: Sequence[str],
    repeats: int,
    log: Callable[[str], None] | None = None,
) -> list[SpeedRow]:
    """Time ``methods`` (``"sgd"`` first) interleaved: one warm-up round, then ``repeats``
    counted rounds. Returns one row per method."""
    from flatmin.train.models import build_model

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
                images_per_s=_median(walls[name]),
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
    from flatmin.bench.memory import peak_rss_bytes

    peaks = {r.method: peak_rss_bytes(case, r.method, repeats=3) for r in rows}
    for r in rows:
        r.measured_extra_bytes = peaks[r.method] - peaks["sgd"]


def _round_ratio(own: Sequence[float], sgd: Sequence[float]) -> float:
    return _median([a / b for a, b in zip(own, sgd, strict=True)])


def profile_block(case: SpeedCase, method: str, rows: int = 15) -> str:
    """torch.profiler's table (top ``rows`` ops by self CPU time) of one block of
    ``method`` after a warm-up block."""
    from torch.profiler import ProfilerActivity, profile

    from flatmin.train.models import build_model

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


def _flush_print(line: str) -> None:
    print(line, flush=True)


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_start": os.getloadavg(),
    }


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--models",
        nargs="+",
        choices=sorted(CASES),
        default=["resnet18", "cnn", "cnn1d"],
        help="models to time (default: all three)",
    )
    group.add_argument(
        "--methods", nargs="+", metavar="NAME", help="methods to time (default: every registered)"
    )
    group.add_argument(
        "--repeats", type=int, default=5, help="counted interleaved rounds (default: 5)"
    )
    group.add_argument("--steps", type=int, help="steps per block (default: per model)")
    group.add_argument("--batch-size", type=int, help="batch size (default: per model)")
    group.add_argument("--profile", metavar="METHOD", help="also profile one block of METHOD")
    group.add_argument(
        "--channels-last-inputs",
        action="store_true",
        help="image batches in channels_last (weights stay as built, NCHW): on the CPUs "
        "measured here the faster layout for SGD's own step on the 2-D models",
    )
    group.add_argument(
        "--measure-memory",
        action="store_true",
        help="also measure each method's peak resident memory over SGD's, one process per "
        "method and model (flatmin.bench.memory)",
    )


def run(args: argparse.Namespace) -> int:
    from flatmin.train.registry import METHODS

    torch.set_num_threads(args.threads)
    methods = list(args.methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"flatmin bench speed: error: unknown methods {unknown}", file=sys.stderr)
        return 2
    methods = ["sgd", *[m for m in methods if m != "sgd"]]
    command = " ".join(getattr(args, "argv", None) or ["flatmin", *sys.argv[1:]])
    info = machine()
    started = time.perf_counter()
    rows: list[SpeedRow] = []
    profiles: dict[str, str] = {}
    for key in args.models:
        case = CASES[key]
        overrides = {
            k: v
            for k, v in (("steps", args.steps), ("batch_size", args.batch_size))
            if v is not None
        }
        overrides["channels_last_inputs"] = bool(getattr(args, "channels_last_inputs", False))
        case = SpeedCase(**{**asdict(case), **overrides})
        case_rows = measure_case(case, methods, args.repeats, log=_flush_print)
        if getattr(args, "measure_memory", False):
            measure_memory(case, case_rows)
        rows += case_rows
        if args.profile:
            for name in ("sgd", args.profile):
                profiles[f"{case.name}/{name}"] = profile_block(case, name)
    wall = time.perf_counter() - started
    info["loadavg_end"] = os.getloadavg()
    text = "\n".join(
        [
            f"# {command}",
            f"# machine: {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
            f"torch {info['torch']}, load average at start {info['loadavg_start']}, "
            f"at end {info['loadavg_end']}; wall time {wall:.0f} s",
            f"# {args.repeats} counted rounds after a warm-up round; image batches "
            f"{'channels_last' if overrides['channels_last_inputs'] else 'NCHW'}; "
            "block = steps × batch: "
            + ", ".join(
                f"{c.name} {args.steps or c.steps}×{args.batch_size or c.batch_size}"
                for k, c in CASES.items()
                if k in args.models
            ),
            "",
            format_table(rows),
            "",
            "Counted extra memory: from tensor sizes (Method.extra_memory_bytes). Measured: "
            "peak resident memory of a process training the method minus SGD's "
            "(--measure-memory, median of 3 processes; repeated figures differ by up to "
            "~20 MiB, the allocator's doing).",
            *[f"\n## profile {name}\n{table}" for name, table in profiles.items()],
        ]
    )
    print(text)
    out = Path(args.out or "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed_{'-'.join(args.models)}_t{args.threads}"
    if overrides["channels_last_inputs"]:
        stem += "_cl"
    (out / f"{stem}.txt").write_text(text + "\n")
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": command,
                "machine": info,
                "wall_time": wall,
                "rows": [asdict(r) for r in rows],
            },
            indent=1,
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flatmin.bench.speed``: the same as ``flatmin bench`` with this mode."""
    parser = argparse.ArgumentParser(prog="python -m flatmin.bench.speed")
    parser.add_argument("--out", metavar="DIR", help="results directory (benchmarks/results)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    add_arguments(parser.add_argument_group("speed options"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = ["python -m flatmin.bench.speed", *argv]
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
