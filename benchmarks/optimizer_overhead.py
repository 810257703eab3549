"""Time SAM's own bookkeeping: first_step + second_step, forward and backward excluded.

flatmin's SAM (``torch._foreach_*`` over device/dtype buckets, norms kept as tensors)
is timed side by side, in one process and interleaved, against the same arithmetic
written as a plain per-parameter Python loop (the shape of the popular port: a
per-parameter norm, ``e_w`` kept in the optimizer state, ``p.add_``/``p.sub_``), and
against the base optimizer's step alone. Gradients are fixed random tensors written
into ``.grad`` before each pass, so only optimizer work is measured.

    python benchmarks/optimizer_overhead.py --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from flatmin import SAM


def deep_model(blocks: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class LoopSAM:
    """The reference: SAM's arithmetic as a per-parameter Python loop."""

    def __init__(self, params, base_cls, rho=0.05, **kw):
        self.params = list(params)
        self.base = base_cls(self.params, **kw)
        self.rho = rho
        self.state: dict = {}

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(
            torch.stack([p.grad.norm(2) for p in self.params if p.grad is not None]), 2
        )
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.state[p] = {"old_p": p.data.clone()}
            p.add_(p.grad * scale)

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            if p in self.state:
                p.data = self.state[p]["old_p"]
        self.base.step()


def fill_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def time_one(kind, opt, params, grads1, grads2, steps):
    start = time.perf_counter()
    for _ in range(steps):
        fill_grads(params, grads1)
        if kind == "sgd":
            opt.step()
            continue
        opt.first_step()
        fill_grads(params, grads2)
        opt.second_step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    kw = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    models = {k: deep_model(args.blocks, args.width) for k in ("sgd", "loop", "flatmin")}
    params = {k: list(m.parameters()) for k, m in models.items()}
    n_tensors = len(params["sgd"])
    n_params = sum(p.numel() for p in params["sgd"])
    grads1 = [torch.randn_like(p) for p in params["sgd"]]
    grads2 = [torch.randn_like(p) for p in params["sgd"]]
    opts = {
        "sgd": torch.optim.SGD(params["sgd"], **kw),
        "loop": LoopSAM(params["loop"], torch.optim.SGD, **kw),
        "flatmin": SAM(params["flatmin"], torch.optim.SGD, **kw),
    }
    for k in opts:  # warm-up
        time_one(k, opts[k], params[k], grads1, grads2, 3)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.repeats):
        for k in opts:
            times[k].append(time_one(k, opts[k], params[k], grads1, grads2, args.steps))

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {n_tensors} parameter tensors, {n_params:,} parameters; threads={args.threads}")
    print(f"{args.repeats} interleaved repeats of {args.steps} steps; medians per step")
    print(f"{'':34s}{'ms/step':>10s}{'SAM overhead over SGD step':>30s}")
    print(f"{'SGD step alone':34s}{med['sgd'] * 1e3:10.3f}{'-':>30s}")
    for k, label in (
        ("loop", "SAM, per-parameter Python loop"),
        ("flatmin", "SAM, flatmin (foreach)"),
    ):
        extra = (med[k] - med["sgd"]) * 1e3
        print(f"{label:34s}{med[k] * 1e3:10.3f}{extra:27.3f} ms")
    ratio = (med["loop"] - med["sgd"]) / (med["flatmin"] - med["sgd"])
    print(f"bookkeeping: the loop adds {ratio:.2f}x the time flatmin adds")
    print(f"total step (first+second): loop / flatmin = {med['loop'] / med['flatmin']:.2f}")


if __name__ == "__main__":
    main()
