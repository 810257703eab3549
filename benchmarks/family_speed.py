"""Throughput of SGD, SAM, GSAM, LookSAM (k = 5) and ESAM side by side in one process.

A small BatchNorm CNN (``flatmin.train.models.cnn``: three conv-BN-ReLU stages) trains
on fixed synthetic 32×32 RGB batches. The methods take turns — A B C D E, A B C D E,
… — each timing a block of ``--steps`` steps per round, so drift of a shared CPU hits
all of them alike. Reported per method: median images/s over the rounds by the wall
clock and by this process's CPU time (the latter barely moves when other processes
compete for the cores), and the median of the per-round ratios to SGD. ``--steps`` should be a
multiple of 5 so that every LookSAM block holds the same share of full steps.

Usage::

    python benchmarks/family_speed.py --threads 2 --repeats 7 \
        --out benchmarks/results/family_speed.txt
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin import ESAM, GSAM, SAM, LookSAM
from flatmin.train.models import cnn

Batch = tuple[Tensor, Tensor]
Step = Callable[[Batch], None]
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def sgd_step(model: nn.Module) -> Step:
    opt = torch.optim.SGD(model.parameters(), **SGD_KW)

    def step(batch: Batch) -> None:
        x, y = batch
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def closure_step(model: nn.Module, opt: torch.optim.Optimizer) -> Step:
    """SAM-style closure: forward + backward, returns the mean loss."""

    def step(batch: Batch) -> None:
        x, y = batch
        opt.zero_grad(set_to_none=True)

        def closure() -> Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure, model=model)

    return step


def esam_step(model: nn.Module, opt: ESAM) -> Step:
    """ESAM's per-sample closure, so data selection is active."""

    def step(batch: Batch) -> None:
        x, y = batch
        opt.zero_grad(set_to_none=True)

        def closure(indices: Tensor | None = None) -> Tensor:
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")

        opt.step(closure, model=model)

    return step


METHODS: dict[str, Callable[[nn.Module], Step]] = {
    "SGD": sgd_step,
    "SAM": lambda m: closure_step(m, SAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)),
    "GSAM": lambda m: closure_step(
        m, GSAM(m.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, **SGD_KW)
    ),
    "LookSAM(k=5)": lambda m: closure_step(
        m, LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, **SGD_KW)
    ),
    "ESAM": lambda m: esam_step(
        m, ESAM(m.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, seed=0, **SGD_KW)
    ),
}


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (args.batch_size,), generator=generator),
        )
        for _ in range(4)
    ]
    if args.channels_last_inputs:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    steps: dict[str, Step] = {}
    for name, make in METHODS.items():
        torch.manual_seed(0)
        model = cnn(10, (3, 32, 32)).train()
        steps[name] = make(model)
        for i in range(args.warmup):
            steps[name](batches[i % len(batches)])

    wall: dict[str, list[float]] = {name: [] for name in METHODS}
    cpu: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                step(batches[i % len(batches)])
            images = args.steps * args.batch_size
            wall[name].append(images / (time.perf_counter() - start))
            cpu[name].append(images / (time.process_time() - start_cpu))

    lines = [
        f"# {shlex.join(['python', Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}",
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, model cnn (BatchNorm), "
        f"batch {args.batch_size} of 3x32x32 "
        f"({'channels_last' if args.channels_last_inputs else 'NCHW'} inputs, NCHW weights), "
        f"{args.steps} steps per block, "
        f"{args.repeats} interleaved rounds, {args.warmup} warm-up steps per method",
        "# wall: images per wall-clock second; cpu: images per second of this process's CPU "
        "time (less sensitive to other processes on a shared machine)",
        "# ratio: median over rounds of (method / SGD in the same round)",
        "",
        f"{'method':<14}{'wall img/s':>12}{'min':>8}{'max':>8}{'ratio':>9}"
        f"{'cpu img/s':>12}{'ratio':>9}",
    ]
    for name in METHODS:
        lines.append(
            f"{name:<14}{statistics.median(wall[name]):>12.1f}{min(wall[name]):>8.1f}"
            f"{max(wall[name]):>8.1f}{_paired(wall, name, 'SGD'):>9.1%}"
            f"{statistics.median(cpu[name]):>12.1f}{_paired(cpu, name, 'SGD'):>9.1%}"
        )
    lines.append("")
    for clock, rates in (("wall", wall), ("cpu", cpu)):
        against_sam = ", ".join(
            f"{name} {_paired(rates, name, 'SAM'):.1%}" for name in ("GSAM", "LookSAM(k=5)", "ESAM")
        )
        lines.append(f"against SAM ({clock}): {against_sam}")
    return "\n".join(lines) + "\n"


def _paired(rates: dict[str, list[float]], name: str, reference: str) -> float:
    return statistics.median(v / r for v, r in zip(rates[name], rates[reference]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (>= 5)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--channels-last-inputs",
        action="store_true",
        help="inputs in channels_last (weights stay NCHW): on these CPUs the fastest layout "
        "for every method's passes",
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--append", action="store_true", help="append to --out instead")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5: the medians need several rounds")
    report = run(args)
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + report)


if __name__ == "__main__":
    main()
