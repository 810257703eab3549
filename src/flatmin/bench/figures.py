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

import json
from pathlib import Path

import numpy as np
from torch.nn import functional as F

from flatmin.measure import gaussian_noise_curve, loss_landscape
from flatmin.train.checkpoint import load_run, read_metrics
from flatmin.train.loop import first_samples

FIGURE_METHODS = ("sgd", "sam", "saf", "mesa")
COLORS = {"sgd": "tab:gray", "sam": "tab:blue", "saf": "tab:green", "mesa": "tab:red"}
NOISE_SCALES = (0.0, 0.01, 0.02, 0.035, 0.05, 0.07, 0.1, 0.14)
MEASURE_SAMPLES = 1024


def read_curves(section_dir: Path, method: str, key: str) -> np.ndarray:
    """``curves[seed, epoch]`` of ``key`` over the finished runs ``METHOD-s*`` (runs of
    unequal length are cut to the shortest)."""
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
    import matplotlib  # optional: the flatmin[plot] extra

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


def plot_noise_and_surfaces(
    section_dir: Path, out: Path, steps: int = 21, prefix: str = ""
) -> list[Path]:
    """``noise_curve.png`` and ``loss_surface.png`` (after ``prefix``) from the seed-0 run
    of each method."""
    import matplotlib  # optional: the flatmin[plot] extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {
        m: section_dir / f"{m}-s0"
        for m in FIGURE_METHODS
        if (section_dir / f"{m}-s0" / "final.json").is_file()
    }
    if not runs:
        return []
    noise, surfaces = {}, {}
    for method, run_dir in runs.items():
        run = load_run(run_dir)
        model, batch = run.model, first_samples(run.data.train, MEASURE_SAMPLES)
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


def draw_figures(
    section_dir: Path, out: Path, surface_steps: int = 21, prefix: str = ""
) -> list[Path]:
    """Every figure of the section's runs in ``section_dir``, written into ``out``."""
    if not section_dir.is_dir():
        raise FileNotFoundError(f"no runs in {section_dir}")
    out.mkdir(parents=True, exist_ok=True)
    section = section_dir.name
    return [
        plot_per_epoch(section_dir, "train_loss", "training loss (noisy labels)",
                       f"Training loss per epoch ({section}; mean ± std over seeds)",
                       out / f"{prefix}train_loss.png"),
        plot_per_epoch(section_dir, "sharpness", "SAM sharpness L(w+ε) − L(w), ρ = 0.05",
                       f"SAM sharpness per epoch ({section}; fixed batch of 128)",
                       out / f"{prefix}sharpness_per_epoch.png"),
        *plot_noise_and_surfaces(section_dir, out, surface_steps, prefix),
    ]  # fmt: skip
