"""Gaussian weight-noise curves against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatmin.measure import gaussian_noise_curve
from tests.measure.helpers import make_data, make_mlp, mean_output


class DistanceToAnchor(nn.Module):
    """Loss ``½‖W − W₀‖²`` with ``W₀`` the initial weights: zero at the start."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
        self.register_buffer("anchor", self.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * ((self.weight - self.anchor) ** 2).sum().expand(len(x))


def test_noise_has_the_asked_fraction_of_the_weights_norm():
    # filter-normalized noise at scale σ has ‖σ·d‖² = σ²‖W‖², so L = ½σ²‖W‖² for every draw
    model = DistanceToAnchor()
    data = (torch.zeros(1, 1), torch.zeros(1))
    scales = [0.0, 0.07, 0.5]
    result = gaussian_noise_curve(model, mean_output, data, scales=scales, repeats=3)
    expected = [0.5 * s**2 * float(model.weight.detach().norm() ** 2) for s in scales]
    np.testing.assert_allclose(result.mean, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(result.std, 0.0, atol=1e-12)
    assert result.losses.shape == (3, 3)


def test_zero_scale_is_the_model_loss_and_noise_raises_the_loss():
    model = make_mlp(batch_norm=True)
    x, y = make_data()
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    result = gaussian_noise_curve(model, F.cross_entropy, (x, y), scales=[0.0, 1.0], repeats=4)
    assert (result.losses[0] == loss).all()
    assert result.std[0] == 0.0
    assert result.std[1] > 0.0
    assert (result.num_samples, result.repeats, result.seed) == (32, 4, 0)


def test_seed_decides_the_draws():
    model = make_mlp(batch_norm=False)
    data = make_data()
    a = gaussian_noise_curve(model, F.cross_entropy, data, scales=[0.2], repeats=2, seed=3)
    b = gaussian_noise_curve(model, F.cross_entropy, data, scales=[0.2], repeats=2, seed=3)
    c = gaussian_noise_curve(model, F.cross_entropy, data, scales=[0.2], repeats=2, seed=4)
    assert np.array_equal(a.losses, b.losses)
    assert not np.array_equal(a.losses, c.losses)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"scales": []}, "scales"), ({"scales": [-0.1]}, "scales"), ({"repeats": 0}, "repeats")],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_noise_curve(make_mlp(batch_norm=False), F.cross_entropy, make_data(), **kwargs)
