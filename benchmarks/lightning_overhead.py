"""Per-step time of Lightning + SAM relative to the plain loop + SAM, side by side.

Both train the same model on the same ``DataLoader`` with ``SAM(model=net)``: the plain
loop calls ``opt.step(closure)`` per batch (the README's loop); Lightning runs automatic
optimization (SAM returned from ``configure_optimizers``, ``FlatminCallback``, no logger,
no progress bar, no checkpointing; ``training_step`` only computes the loss, as the
plain closure does). The per-step time of a run is the median gap between consecutive
batch starts after ``--warmup`` steps (Lightning's fit set-up is excluded). Runs are
interleaved in one process, the order alternating by round; the reported figure is the
median over rounds of the per-round ratio Lightning / plain.

    python benchmarks/lightning_overhead.py --threads 1 --rounds 9 --steps 60
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatmin import SAM
from flatmin.integrations.lightning import FlatminCallback

# name: (inputs, hidden width, hidden layers, classes, batch size)
SIZES = {
    "tiny MLP 8-16-3, batch 16": (8, 16, 1, 3, 16),
    "MLP 64-256-256-10, batch 128": (64, 256, 2, 10, 128),
    "MLP 784-1024-1024-10, batch 256": (784, 1024, 2, 10, 256),
}


def make_model(inputs: int, width: int, layers: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    parts: list[nn.Module] = []
    for i in range(layers):
        parts += [nn.Linear(inputs if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*parts, nn.Linear(width, classes))


def make_loader(inputs: int, classes: int, batch: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    n = batch * steps
    x, y = torch.randn(n, inputs, generator=g), torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def sam_for(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, model=model)


def plain(size: tuple, steps: int) -> list[float]:
    inputs, width, layers, classes, batch = size
    model = make_model(inputs, width, layers, classes)
    opt = sam_for(model)
    stamps = []
    for x, y in make_loader(inputs, classes, batch, steps):
        stamps.append(time.perf_counter())

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    stamps.append(time.perf_counter())
    return stamps


class Stamps(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.stamps.append(time.perf_counter())


class Module(pl.LightningModule):
    def __init__(self, size: tuple) -> None:
        super().__init__()
        inputs, width, layers, classes, _ = size
        self.net = make_model(inputs, width, layers, classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return sam_for(self.net)


def lightning(size: tuple, steps: int) -> list[float]:
    inputs, _, _, classes, batch = size
    stamps = Stamps()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[FlatminCallback(), stamps],
    )  # fmt: skip
    trainer.fit(Module(size), make_loader(inputs, classes, batch, steps))
    return stamps.stamps


def per_step(stamps: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{now}; torch {torch.__version__}, pytorch_lightning {pl.__version__}; "
          f"threads={args.threads}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{args.rounds} interleaved rounds of {args.steps} steps (first {args.warmup} dropped)")
    for name, size in SIZES.items():
        plain_ms, lightning_ms, ratios = [], [], []
        for r in range(args.rounds):
            order = (plain, lightning) if r % 2 == 0 else (lightning, plain)
            result = {run.__name__: per_step(run(size, args.steps), args.warmup) for run in order}
            plain_ms.append(result["plain"] * 1e3)
            lightning_ms.append(result["lightning"] * 1e3)
            ratios.append(result["lightning"] / result["plain"])
        print(
            f"{name}: plain + SAM {statistics.median(plain_ms):.3f} ms/step, Lightning + SAM "
            f"{statistics.median(lightning_ms):.3f} ms/step, ratio (median of {args.rounds}) "
            f"{statistics.median(ratios):.3f}; rounds: {', '.join(f'{v:.2f}' for v in ratios)}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
