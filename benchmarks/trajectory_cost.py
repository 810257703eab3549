"""Cost of SAF and MESA against plain SGD: throughput (images/s) and extra memory.

Runs SGD, SGD+SAF, SGD+MESA with its defaults and SGD+MESA with each of its teacher
options switched off (the model's memory layout instead of ``"auto"``, no BatchNorm
folding, neither: the behaviour before the fast teacher) interleaved in one process
(A B C A B C …) on a small CNN with BatchNorm and synthetic 3×32×32 data, so that all of
them see the same machine load; each block is one pass ("epoch") over the synthetic set.
The extra parts (MESA's EMA update, its update followed by the default teacher's forward,
which includes refolding the BatchNorms, and the SAF term) are also timed alone in the
same rounds. Reports the median of the
blocks' images/s, the ratio of medians to SGD, the median of the per-round ratios
(each round's SGD block against the same round's method block) and, as the figure least
disturbed by other work on a shared machine, the ratio of the fastest blocks.

SAF runs in its steady state: its store is filled for ``lag_epochs`` epochs beforehand,
so every timed step reads a valid target, computes the KL and records the batch. MESA's
term is active in every timed step and its EMA teacher is updated after every step.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/trajectory_cost.py --threads 2 --repeats 15 --steps 4

On a CPU shared with other work, ``OMP_WAIT_POLICY=PASSIVE`` keeps idle OpenMP workers
from spinning against their own main thread; without it every small operator could stall
for a scheduler slice. The header records the setting and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatmin import MESA, SAF

CIFAR10 = (50_000, 10)
CIFAR100 = (50_000, 100)
IMAGENET = (1_281_167, 1000)
MESA_OPTIONS = {
    "SGD+MESA": {},
    "SGD+MESA, model's layout": {"teacher_memory_format": None},
    "SGD+MESA, no BN folding": {"fold_batchnorm": False},
    "SGD+MESA, model's layout, no folding (before)": {
        "teacher_memory_format": None,
        "fold_batchnorm": False,
    },
}
TEACHER = "MESA EMA update + teacher forward"


def small_cnn(width: int, num_classes: int = 10) -> nn.Module:
    """Three conv-BN-ReLU blocks (32→16→8→4 px), global pooling and a linear head."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (width, 2 * width, 4 * width):
        layers += [
            nn.Conv2d(channels, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def make_step(method: str, args: argparse.Namespace, num_samples: int) -> tuple[Callable, dict]:
    """A closure running one training step of ``method`` on a batch, and its extras."""
    torch.manual_seed(args.seed)
    model = small_cnn(args.width)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    extras: dict = {"model": model}

    if method == "SGD":

        def step(x: Tensor, y: Tensor, idx: Tensor) -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    elif method == "SGD+SAF":
        saf = SAF(num_samples, 10, lag_epochs=args.lag_epochs, start_epoch=0)
        for epoch in range(args.lag_epochs):  # steady state: targets exist for every sample
            saf.set_epoch(epoch)
            for idx in torch.randperm(num_samples).split(args.batch):
                saf(torch.randn(len(idx), 10), idx)
        extras["saf"] = saf

        def step(x: Tensor, y: Tensor, idx: Tensor) -> None:
            logits = model(x)
            loss = F.cross_entropy(logits, y) + saf(logits, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    elif method in MESA_OPTIONS:
        mesa = MESA(model, start_epoch=0, **MESA_OPTIONS[method])
        mesa.set_epoch(1)
        extras["mesa"] = mesa

        def step(x: Tensor, y: Tensor, idx: Tensor) -> None:
            logits = model(x)
            loss = F.cross_entropy(logits, y) + mesa(x, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mesa.update()

    elif method == TEACHER:
        mesa = MESA(model, start_epoch=0)

        def step(x: Tensor, y: Tensor, idx: Tensor) -> None:
            mesa.update()  # the next forward refolds the BatchNorms, as in training
            mesa.teacher_logits(x)

    elif method == "MESA EMA update":
        mesa = MESA(model, start_epoch=0)

        def step(x: Tensor, y: Tensor, idx: Tensor) -> None:
            mesa.update()

    elif method == "SAF term (forward + backward)":
        saf = SAF(num_samples, 10, lag_epochs=1, start_epoch=0)
        extras["saf"] = saf
        for idx in torch.arange(num_samples).split(args.batch):
            saf(torch.randn(len(idx), 10), idx)
        logits = torch.randn(args.batch, 10, requires_grad=True)

        def step(x: Tensor, y: Tensor, idx: Tensor) -> None:
            saf(logits[: len(idx)], idx).backward()

    else:
        raise ValueError(f"unknown method {method!r}")
    return step, extras


def run_block(step: Callable, inputs: Tensor, targets: Tensor, batch: int, seed: int) -> float:
    """One pass over the synthetic set in a seeded random order; returns wall seconds."""
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for idx in order.split(batch):
        step(inputs[idx], targets[idx], idx)
    return time.perf_counter() - start


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.2f} MiB ({num_bytes:,} bytes)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of A B C blocks (>= 5)")
    parser.add_argument("--steps", type=int, default=10, help="steps per block (one epoch)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=32, help="channels of the first block")
    parser.add_argument("--lag-epochs", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--channels-last", action="store_true", help="model and inputs in channels_last"
    )
    parser.add_argument(
        "--channels-last-inputs",
        action="store_true",
        help="inputs in channels_last, the model's weights as they are (NCHW); on these "
        "CPUs the fastest layout for SGD's own step",
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")

    torch.set_num_threads(args.threads)
    print(f"# command: {' '.join(['python', *sys.argv])}")
    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}  {platform.processor() or platform.machine()}  "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}  "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )

    num_samples = args.steps * args.batch
    generator = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(num_samples, 3, 32, 32, generator=generator)
    if args.channels_last or args.channels_last_inputs:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (num_samples,), generator=generator)

    methods = ["SGD", "SGD+SAF", *MESA_OPTIONS]
    components = [TEACHER, "MESA EMA update", "SAF term (forward + backward)"]
    steps, extras = {}, {}
    for method in methods + components:
        steps[method], extras[method] = make_step(method, args, num_samples)
        for idx in torch.arange(args.warmup_steps * args.batch).split(args.batch):
            steps[method](inputs[idx], targets[idx], idx)

    wall: dict[str, list[float]] = {m: [] for m in methods + components}
    saf = extras["SGD+SAF"]["saf"]
    for round_ in range(args.repeats):
        saf.set_epoch(args.lag_epochs + round_)
        extras["SAF term (forward + backward)"]["saf"].set_epoch(1 + round_)
        for method in methods + components:
            seconds = run_block(steps[method], inputs, targets, args.batch, args.seed + round_)
            wall[method].append(seconds)

    layout = (
        "channels_last"
        if args.channels_last
        else "NCHW weights, channels_last inputs"
        if args.channels_last_inputs
        else "contiguous (NCHW)"
    )
    print(
        f"\nsmall CNN (3 conv-BN-ReLU blocks, width {args.width}, {layout}), batch "
        f"{args.batch}, {args.steps} steps per block, {args.repeats} interleaved rounds\n"
    )
    print(
        "| method | images/s (median) | min–max | vs SGD: ratio of medians "
        "| vs SGD: median per-round ratio | vs SGD: ratio of best blocks |"
    )
    print("|---|---|---|---|---|---|")
    for method in methods:
        rates = [num_samples / s for s in wall[method]]
        ratio = statistics.median(wall["SGD"]) / statistics.median(wall[method])
        paired = statistics.median(
            base / s for base, s in zip(wall["SGD"], wall[method], strict=True)
        )
        best_ratio = min(wall["SGD"]) / min(wall[method])
        print(
            f"| {method} | {statistics.median(rates):,.1f} | {min(rates):,.1f}–{max(rates):,.1f} "
            f"| {100 * ratio:.1f} % | {100 * paired:.1f} % | {100 * best_ratio:.1f} % |"
        )

    def per_step_ms(name: str, pick: Callable) -> float:
        return 1000 * pick(wall[name]) / args.steps

    print("\nwhere the time goes, per step (ms), timed in the same rounds\n")
    print("| part | median | best |")
    print("|---|---|---|")
    for name in ["SGD", *components]:
        label = "SGD step (forward + backward + update)" if name == "SGD" else name
        med, best = per_step_ms(name, statistics.median), per_step_ms(name, min)
        print(f"| {label} | {med:.2f} | {best:.2f} |")
    sgd, teacher, _, term = (per_step_ms(name, min) for name in ["SGD", *components])
    print(
        f"\nfrom the best blocks: SAF ≈ {100 * sgd / (sgd + term):.1f} % of SGD, "
        f"MESA ≈ {100 * sgd / (sgd + teacher):.1f} % of SGD "
        "(SGD step / (SGD step + the method's extra parts))"
    )
    print("\nper-block wall seconds, in run order:")
    for method in methods + components:
        print(f"  {method:45s} " + " ".join(f"{s:.3f}" for s in wall[method]))

    mesa = extras["SGD+MESA"]["mesa"]
    lag = args.lag_epochs
    print(f"\nextra memory (SAF: float16 store, {lag} slots per sample, epoch bookkeeping)\n")
    print("| what | extra memory |")
    print("|---|---|")
    print(f"| SAF, this synthetic set ({num_samples:,} × 10) | {mib(saf.memory_bytes)} |")
    for name, (n, c) in (
        ("CIFAR-10", CIFAR10),
        ("CIFAR-100", CIFAR100),
        ("ImageNet-1k", IMAGENET),
    ):
        per_sample = SAF(1, c, lag_epochs=lag).memory_bytes  # the formula is linear in N
        print(f"| SAF, {name} ({n:,} × {c}) | {mib(per_sample * n)} |")
    print(
        f"| MESA teacher, this CNN (parameters + buffers + folded weights) | {mib(mesa.memory_bytes)} |"
    )


if __name__ == "__main__":
    main()
