"""PNG figures of the measurements and of training runs (needs ``flatmin[plot]``).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas — no
``pyplot`` global state, no display needed — and every function writes one PNG and
returns its path.

- :func:`plot_landscape_curve`: a 1-D landscape or interpolation;
- :func:`plot_landscape_contour` and :func:`plot_landscape_surface`: a 2-D landscape as
  filled contours and as a 3-D surface (Li et al., 2018, Figs. 1 and 5);
- :func:`plot_noise_curve`: loss against Gaussian-noise scale, mean ± std over draws
  (the SAF paper's Figure 4);
- :func:`plot_runs`: training loss, test accuracy and, when tracked, the SAM sharpness
  per epoch of several runs overlaid (the SAF paper's Figure 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flatmin.measure.landscape import LandscapeResult
from flatmin.measure.noise import NoiseCurveResult


def _figure(width: float = 5.5, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'flatmin[plot]'") from error
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _subtitle(result: LandscapeResult) -> str:
    return f"{result.num_samples} samples, seed {result.seed}"


def plot_landscape_curve(result: LandscapeResult, path: str | Path) -> Path:
    """The loss along one direction (or the interpolation ``t``), centre marked."""
    if result.dims != 1:
        raise ValueError(f"a curve needs a 1-D landscape, got dims={result.dims}")
    figure = _figure()
    ax = figure.add_subplot()
    ax.plot(result.coords[0], result.losses, marker=".", color="tab:blue")
    if result.kind == "interpolation":
        ax.set_xlabel("t  (0: this model, 1: the other)")
        for t in (0.0, 1.0):
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    else:
        ax.set_xlabel(f"α along a {result.normalization or 'raw'}-normalized direction")
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("loss")
    ax.set_title(f"Loss landscape ({_subtitle(result)})")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def _check_2d(result: LandscapeResult) -> None:
    if result.dims != 2:
        raise ValueError(f"this plot needs a 2-D landscape, got dims={result.dims}")


def plot_landscape_contour(result: LandscapeResult, path: str | Path, levels: int = 30) -> Path:
    """Filled contours of the loss over the two directions, the centre marked."""
    _check_2d(result)
    figure = _figure(5.5, 4.5)
    ax = figure.add_subplot()
    alpha, beta = np.meshgrid(result.coords[0], result.coords[1], indexing="ij")
    filled = ax.contourf(alpha, beta, result.losses, levels=levels, cmap="viridis")
    ax.contour(alpha, beta, result.losses, levels=levels, colors="white", linewidths=0.3)
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=10, linestyle="none")
    figure.colorbar(filled, ax=ax, label="loss")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title(f"Loss contours ({_subtitle(result)})")
    ax.set_aspect("equal")
    return _save(figure, path)


def plot_landscape_surface(result: LandscapeResult, path: str | Path) -> Path:
    """The loss over the two directions as a 3-D surface."""
    _check_2d(result)
    figure = _figure(6.0, 5.0)
    ax = figure.add_subplot(projection="3d")
    alpha, beta = np.meshgrid(result.coords[0], result.coords[1], indexing="ij")
    ax.plot_surface(alpha, beta, result.losses, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(f"Loss surface ({_subtitle(result)})")
    return _save(figure, path)


def plot_noise_curve(
    results: NoiseCurveResult | Sequence[tuple[str, NoiseCurveResult]], path: str | Path
) -> Path:
    """Mean loss ± one standard deviation against the noise scale, one line per result."""
    labelled = [("", results)] if isinstance(results, NoiseCurveResult) else list(results)
    if not labelled:
        raise ValueError("plot_noise_curve needs at least one result")
    figure = _figure()
    ax = figure.add_subplot()
    for label, result in labelled:
        ax.errorbar(
            result.scales, result.mean, yerr=result.std, marker="o", capsize=3, label=label or None
        )
    ax.set_xlabel("noise scale σ (fraction of each filter's norm)")
    ax.set_ylabel("loss")
    first = labelled[0][1]
    ax.set_title(f"Loss under Gaussian weight noise ({first.repeats} draws per scale)")
    if any(label for label, _ in labelled):
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(figure, path)


@dataclass
class RunCurves:
    """The per-epoch curves of one training run; a missing value is NaN."""

    label: str
    epochs: list[float]
    train_loss: list[float]
    test_acc: list[float]
    sharpness: list[float] = field(default_factory=list)

    @property
    def has_sharpness(self) -> bool:
        return any(np.isfinite(self.sharpness))


def plot_runs(runs: Sequence[RunCurves], path: str | Path) -> Path:
    """Training loss, test accuracy and (when any run tracked it) sharpness per epoch."""
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    panels = [("train_loss", "training loss"), ("test_acc", "test accuracy")]
    if any(run.has_sharpness for run in runs):
        panels.append(("sharpness", "SAM sharpness L(w+ε) − L(w)"))
    figure = _figure(4.5 * len(panels), 3.8)
    for index, (key, title) in enumerate(panels, start=1):
        ax = figure.add_subplot(1, len(panels), index)
        for number, run in enumerate(runs):
            values = np.asarray(getattr(run, key), dtype=float)
            shown = np.isfinite(values)
            if shown.any():  # one colour per run across the panels
                epochs = np.asarray(run.epochs)[shown]
                ax.plot(epochs, values[shown], marker=".", color=f"C{number}", label=run.label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if key == "train_loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(figure, path)
