"""Every figure is a real, non-empty PNG; wrong-shaped input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F

from flatmin.measure import gaussian_noise_curve, loss_landscape
from flatmin.measure.plots import (
    RunCurves,
    plot_landscape_contour,
    plot_landscape_curve,
    plot_landscape_surface,
    plot_noise_curve,
    plot_runs,
)
from tests.measure.helpers import make_data, make_mlp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # axes, labels and a plotted surface, not a blank canvas


@pytest.fixture(scope="module")
def landscapes():
    model, data = make_mlp(batch_norm=True), make_data()
    return {
        dims: loss_landscape(model, F.cross_entropy, data, dims=dims, steps=7, span=2.0)
        for dims in (1, 2)
    }


def test_landscape_figures(landscapes, tmp_path):
    _assert_png(plot_landscape_curve(landscapes[1], tmp_path / "curve.png"))
    _assert_png(plot_landscape_contour(landscapes[2], tmp_path / "contour.png"))
    _assert_png(plot_landscape_surface(landscapes[2], tmp_path / "sub" / "surface.png"))


def test_landscape_figures_refuse_the_wrong_dimension(landscapes, tmp_path):
    with pytest.raises(ValueError, match="1-D"):
        plot_landscape_curve(landscapes[2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D"):
        plot_landscape_contour(landscapes[1], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_noise_curve_single_and_labelled(tmp_path):
    model, data = make_mlp(batch_norm=False), make_data()
    result = gaussian_noise_curve(model, F.cross_entropy, data, scales=[0, 0.1, 0.3], repeats=3)
    _assert_png(plot_noise_curve(result, tmp_path / "one.png"))
    _assert_png(plot_noise_curve([("a", result), ("b", result)], tmp_path / "two.png"))
    with pytest.raises(ValueError, match="at least one"):
        plot_noise_curve([], tmp_path / "none.png")


def test_runs_overlay_with_and_without_sharpness(tmp_path):
    epochs = [1.0, 2.0, 3.0]
    plain = RunCurves("sgd", epochs, [1.0, 0.5, 0.3], [0.5, 0.7, 0.8])
    tracked = RunCurves("saf", epochs, [1.0, 0.6, 0.4], [0.5, 0.72, 0.83], [0.1, np.nan, 0.02])
    _assert_png(plot_runs([plain], tmp_path / "plain.png"))
    _assert_png(plot_runs([plain, tracked], tmp_path / "both.png"))
    with pytest.raises(ValueError, match="at least one"):
        plot_runs([], tmp_path / "none.png")
