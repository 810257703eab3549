"""The SAF paper's figures at our scale, from the runs of ``flatmin bench accuracy``.

Du et al. (NeurIPS 2022) show (i) the training loss per epoch — SAF and MESA converge like
SGD; (ii) SAM's sharpness measure ``L(w + ρ·g/‖g‖) − L(w)`` at ρ = 0.05 per epoch, which
drops once the trajectory loss switches on; (iii) the loss under Gaussian weight noise
(``σ = 0.07 ×`` the weights' norm, filter-wise); (iv) 2-D loss surfaces along two random
filter-normalized Gaussian directions (Li et al., 2018). This module draws the same four
pictures from one section of an accuracy study (by default MNIST-1D with 40 % label
noise):

- ``train_loss.png`` and ``sharpness_per_epoch.png``: mean over the finished seeds (a
  band of ± one std) of each method's ``metrics.jsonl`` (the trainer's
  ``--track-sharpness`` logs the sharpness on a fixed training batch every epoch);
- ``noise_curve.png`` and ``loss_surface.png``: the seed-0 checkpoint of each method,
  measured with :func:`flatmin.measure.gaussian_noise_curve` and
  :func:`flatmin.measure.loss_landscape` on the first 1,024 training samples (with the
  labels it was trained on), in eval mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DESCRIPTION = "the SAF paper's figures (loss, sharpness per epoch, noise, surfaces) from runs"

FIGURE_METHODS = ("sgd", "sam", "saf", "mesa")
COLORS = {"sgd": "tab:gray", "sam": "tab:blue", "saf": "tab:green", "mesa": "tab:red"}
NOISE_SCALES = (0.0, 0.01, 0.02, 0.035, 0.05, 0.07, 0.1, 0.14)
MEASURE_SAMPLES = 1024


def read_curves(section_dir: Path, method: str, key: str) -> np.ndarray:
    """``curves[seed, epoch]`` of ``key`` over the finished runs ``METHOD-s*`` (runs of
    unequal length are cut to the shortest)."""
    from flatmin.train.checkpoint import read_metrics

    curves = []
    for run in sorted(section_dir.glob(f"{method}-s*")):
        if not (run / "final.json").is_file():
            continue
        records = read_metrics(run / "metrics.jsonl")
        curves.append([r[key] for r in records if key in r])
    if not curves:
        return np.empty((0, 0))
    length = min(len(c) for c in curves)
    return np.array([c[:length] for c in curves])


def _trajectory_start(section_dir: Path) -> int | None:
    """The first 1-based epoch in which SAF's term is active (``epoch > start_epoch``)."""
    config = section_dir / "saf-s0" / "config.json"
    if not config.is_file():
        return None
    return int(json.loads(config.read_text())["start_epoch"]) + 2


def plot_per_epoch(section_dir: Path, key: str, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for method in FIGURE_METHODS:
        curves = read_curves(section_dir, method, key)
        if curves.size == 0:
            continue
        epochs = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(epochs, mean, color=COLORS[method], label=f"{method} (n={curves.shape[0]})")
        ax.fill_between(epochs, mean - std, mean + std, color=COLORS[method], alpha=0.15)
    start = _trajectory_start(section_dir)
    if start is not None:
        ax.axvline(start, color="k", ls=":", lw=1)
        ax.text(start + 0.5, ax.get_ylim()[1], " SAF/MESA term on", va="top", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def load_run(run_dir: Path) -> tuple[Any, tuple[Any, Any]]:
    """The trained model of ``run_dir`` and its first training samples ``(x, y)``."""
    import torch

    from flatmin.train.checkpoint import load_checkpoint
    from flatmin.train.data import load_dataset
    from flatmin.train.models import build_model

    config = json.loads((run_dir / "config.json").read_text())
    bundle = load_dataset(
        config["dataset"],
        config["data_dir"],
        seed=config["seed"],
        label_noise=config["label_noise"],
        subset=config["subset"],
        augment=False,
    )
    model = build_model(config["model"], bundle.num_classes, bundle.input_shape)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    n = min(MEASURE_SAMPLES, len(bundle.train))
    items = bundle.train.__getitems__(list(range(n)))
    return model, (torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


def plot_noise_and_surfaces(
    section_dir: Path, out: Path, steps: int = 21, prefix: str = ""
) -> list[Path]:
    """``noise_curve.png`` and ``loss_surface.png`` (after ``prefix``) from the seed-0 run
    of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.nn import functional as F

    from flatmin.measure import gaussian_noise_curve, loss_landscape

    runs = {
        m: section_dir / f"{m}-s0"
        for m in FIGURE_METHODS
        if (section_dir / f"{m}-s0" / "final.json").is_file()
    }
    if not runs:
        return []
    noise, surfaces = {}, {}
    for method, run in runs.items():
        model, batch = load_run(run)
        noise[method] = gaussian_noise_curve(
            model, F.cross_entropy, batch, scales=NOISE_SCALES, repeats=5, seed=0
        )
        surfaces[method] = loss_landscape(
            model, F.cross_entropy, batch, dims=2, steps=steps, span=1.0, seed=0
        )

    fig, (ax, rise) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=120)
    for method, result in noise.items():
        ax.errorbar(result.scales, result.mean, yerr=result.std, color=COLORS[method],
                    marker="o", ms=3, capsize=2, label=method)  # fmt: skip
        rise.errorbar(result.scales, result.mean - result.mean[0], yerr=result.std,
                      color=COLORS[method], marker="o", ms=3, capsize=2, label=method)  # fmt: skip
    for panel, ylabel in ((ax, "training loss L(w + σ·d)"), (rise, "increase L(w + σ·d) − L(w)")):
        panel.axvline(0.07, color="k", ls=":", lw=1)
        panel.set_xlabel("σ (Gaussian weight noise, × each filter's norm)")
        panel.set_ylabel(ylabel)
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8)
    fig.suptitle(
        "Loss under Gaussian weight noise (1,024 training samples, 5 draws per σ, seed-0 "
        "models; dotted: the SAF paper's 0.07)",
        fontsize=10,
    )
    fig.tight_layout()
    noise_path = out / f"{prefix}noise_curve.png"
    fig.savefig(noise_path)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(surfaces), figsize=(3.4 * len(surfaces), 3.4), dpi=120)
    fig.subplots_adjust(wspace=0.45)
    axes = np.atleast_1d(axes)
    top = max(float(np.percentile(r.losses, 95)) for r in surfaces.values())
    low = min(float(r.losses.min()) for r in surfaces.values())
    levels = np.linspace(low, top, 25)
    for ax, (method, result) in zip(axes, surfaces.items(), strict=True):
        a, b = np.meshgrid(result.coords[0], result.coords[1], indexing="ij")
        filled = ax.contourf(a, b, np.minimum(result.losses, top), levels=levels, cmap="viridis")
        ax.contour(a, b, result.losses, levels=levels[::3], colors="w", linewidths=0.4)
        ax.set_title(f"{method}: L(w) = {result.center_loss:.3f}", fontsize=9)
        ax.set_xlabel("α (direction 1)")
        ax.set_aspect("equal")
    axes[0].set_ylabel("β (direction 2)")
    fig.colorbar(filled, ax=axes.tolist(), shrink=0.85, label="training loss")
    fig.suptitle("2-D loss surfaces, filter-normalized Gaussian directions (seed 0)", fontsize=10)
    surface_path = out / f"{prefix}loss_surface.png"
    fig.savefig(surface_path, bbox_inches="tight")
    plt.close(fig)

    summary = {
        m: {
            "noise_scales": r.scales,
            "noise_mean": r.mean.tolist(),
            "noise_std": r.std.tolist(),
            "num_samples": r.num_samples,
            "surface_center": surfaces[m].center_loss,
            "surface_mean": float(surfaces[m].losses.mean()),
        }
        for m, r in noise.items()
    }
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{prefix}figures_measurements.json").write_text(
        json.dumps(summary, indent=1)
    )
    return [noise_path, surface_path]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--runs",
        metavar="DIR",
        default="runs/bench-accuracy-quick",
        help="the accuracy study's run directory (default: runs/bench-accuracy-quick)",
    )
    group.add_argument(
        "--section", default="mnist1d-noise40", help="which section to draw (default: MNIST-1D)"
    )
    group.add_argument("--surface-steps", type=int, default=21, help="grid points per axis")
    group.add_argument("--prefix", default="", help="prefix of the file names (e.g. 'fmnist_')")


def run(args: argparse.Namespace) -> int:
    section_dir = Path(args.runs) / args.section
    if not section_dir.is_dir():
        print(f"flatmin bench figures: error: no runs in {section_dir}", file=sys.stderr)
        return 2
    out = Path(args.out or "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = [
        plot_per_epoch(section_dir, "train_loss", "training loss (noisy labels)",
                       f"Training loss per epoch ({args.section}; mean ± std over seeds)",
                       out / f"{args.prefix}train_loss.png"),
        plot_per_epoch(section_dir, "sharpness", "SAM sharpness L(w+ε) − L(w), ρ = 0.05",
                       f"SAM sharpness per epoch ({args.section}; fixed batch of 128)",
                       out / f"{args.prefix}sharpness_per_epoch.png"),
        *plot_noise_and_surfaces(section_dir, out, args.surface_steps, args.prefix),
    ]  # fmt: skip
    for path in paths:
        print(path)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flatmin.bench.figures``."""
    parser = argparse.ArgumentParser(prog="python -m flatmin.bench.figures")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs go (default: benchmarks)")
    add_arguments(parser.add_argument_group("figure options"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
