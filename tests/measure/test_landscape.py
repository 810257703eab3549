"""Loss landscapes: exact centre, filter-normalized directions, interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatmin.measure import loss_landscape
from flatmin.measure.landscape import filter_normalize, grid, random_direction
from tests.measure.helpers import Quadratic, make_data, make_mlp, mean_output, spd_matrix


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_centre_equals_the_model_loss(dims, batch_norm):
    model = make_mlp(batch_norm)
    x, y = make_data()
    model.eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))
    model.train()
    result = loss_landscape(model, F.cross_entropy, (x, y), dims=dims, steps=5)
    assert result.center_loss == expected
    assert result.losses[(2,) * dims] == expected
    assert result.losses.shape == (5,) * dims
    assert result.coords[0][2] == 0.0
    assert (result.num_samples, result.seed, result.kind) == (32, 0, "random")


def test_train_mode_bn_evaluates_with_batch_statistics():
    model = make_mlp(batch_norm=True)
    x, y = make_data()
    reference = make_mlp(batch_norm=True)  # an identical copy, in train mode
    with torch.no_grad():
        expected = float(F.cross_entropy(reference.train()(x), y))
    result = loss_landscape(model, F.cross_entropy, (x, y), dims=1, steps=3, train_mode_bn=True)
    assert result.center_loss == pytest.approx(expected, rel=1e-14)


def test_filter_normalization_matches_weight_filter_norms():
    conv = nn.Conv2d(3, 5, kernel_size=3)
    linear = nn.Linear(6, 4)
    params = [conv.weight, conv.bias, linear.weight, linear.bias]
    direction = random_direction(params, torch.Generator().manual_seed(0))
    for d, w in ((direction[0], conv.weight), (direction[2], linear.weight)):
        torch.testing.assert_close(
            d.flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=0
        )
        assert not torch.allclose(d, w)  # rescaled noise, not the weights themselves
    assert not direction[1].any() and not direction[3].any()  # biases left out


def test_including_one_dimensional_parameters_normalizes_them_as_one_filter():
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    direction = random_direction([bn.weight], torch.Generator(), include_biases_and_norms=True)
    assert float(direction[0].norm()) == pytest.approx(float(bn.weight.detach().norm()), rel=1e-6)


def test_layer_normalization_and_raw_directions():
    weight = torch.randn(4, 3)
    layer = random_direction([weight], torch.Generator().manual_seed(1), "layer")[0]
    assert float(layer.norm()) == pytest.approx(float(weight.norm()), rel=1e-6)
    raw = random_direction([weight], torch.Generator().manual_seed(1), None)[0]
    assert torch.equal(raw, torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))


def test_filter_normalize_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        filter_normalize(torch.zeros(2, 3), torch.zeros(3, 2))


def test_quadratic_landscape_is_an_exact_parabola():
    # L(w + α·d) = L(w) + α·(Aw)ᵀd + ½α²·dᵀAd with ‖d‖ = ‖w‖ for a 1-D parameter
    spectrum = [3.0, 1.0, 0.5]
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = Quadratic(spd_matrix(spectrum), w)
    data = (torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1))
    result = loss_landscape(
        model, mean_output, data, dims=1, steps=9, span=2.0, include_biases_and_norms=True
    )
    alphas = result.coords[0]
    quadratic, linear, constant = np.polyfit(alphas, result.losses, 2)
    np.testing.assert_allclose(np.polyval([quadratic, linear, constant], alphas), result.losses)
    # The direction: the seed's first Gaussian draw, rescaled to ‖w‖ (one filter).
    d = torch.randn(3, generator=torch.Generator().manual_seed(result.seed), dtype=w.dtype)
    d = d * (w.norm() / d.norm())
    assert quadratic == pytest.approx(float(0.5 * d @ model.a @ d), rel=1e-9)
    assert linear == pytest.approx(float((model.a @ w) @ d), rel=1e-9)
    assert constant == pytest.approx(float(0.5 * w @ model.a @ w), rel=1e-10)


def test_model_without_matrix_weights_needs_biases_included():
    model = Quadratic(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    data = (torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1))
    with pytest.raises(ValueError, match="include_biases_and_norms"):
        loss_landscape(model, mean_output, data, dims=1)


def test_interpolation_hits_both_endpoints():
    model = make_mlp(batch_norm=True)
    other = make_mlp(batch_norm=True)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3)
    x, y = make_data()
    other.eval()
    with torch.no_grad():
        other_loss = float(F.cross_entropy(other(x), y))
    result = loss_landscape(
        model, F.cross_entropy, (x, y), dims=1, steps=9, other=other.state_dict(), t_range=(0, 2)
    )
    t = result.coords[0]
    assert t[0] == 0.0 and t[4] == 1.0
    assert result.losses[0] == result.center_loss
    assert result.losses[4] == pytest.approx(other_loss, rel=1e-12)
    assert result.kind == "interpolation"


def test_grid_midpoint_is_exactly_zero():
    for steps in (3, 7, 21, 51):
        points = grid(steps, -0.7, 0.7)
        assert points[steps // 2] == 0.0
        assert points[0] == -0.7 and points[-1] == 0.7


def test_seed_decides_the_directions():
    model = make_mlp(batch_norm=False)
    data = make_data()
    a = loss_landscape(model, F.cross_entropy, data, dims=1, steps=3, seed=5)
    b = loss_landscape(model, F.cross_entropy, data, dims=1, steps=3, seed=5)
    c = loss_landscape(model, F.cross_entropy, data, dims=1, steps=3, seed=6)
    assert np.array_equal(a.losses, b.losses)
    assert not np.array_equal(a.losses, c.losses)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dims": 3}, "dims"),
        ({"span": 0.0}, "span"),
        ({"steps": 1}, "steps"),
        ({"normalization": "unit"}, "normalization"),
        ({"dims": 2, "other": {}}, "dims=1"),
        ({"dims": 1, "other": {}}, "no entry"),
        ({"dims": 1, "other": {"0.weight": torch.zeros(2, 2)}}, "shape"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loss_landscape(make_mlp(batch_norm=False), F.cross_entropy, make_data(), **kwargs)
