"""SAM sharpness against closed forms on quadratics, and its input checks.

On ``L(w) = ½ (w − x)ᵀA(w − x)`` averaged over samples, ``g = A(w − x̄)`` and for any ε,
``L(w+ε) − L(w) = gᵀε + ½ εᵀAε`` exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatmin.measure import sam_sharpness
from tests.measure.helpers import Quadratic, make_data, make_mlp, mean_output, spd_matrix

EIGENVALUES = [4.0, 2.0, 1.0, 0.5]


def _rise(a: torch.Tensor, g: torch.Tensor, eps: torch.Tensor) -> float:
    return float(g @ eps + 0.5 * eps @ a @ eps)


def _quadratic(samples: torch.Tensor | None = None):
    a = spd_matrix(EIGENVALUES)
    w = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    x = torch.zeros(1, 4, dtype=torch.float64) if samples is None else samples
    return Quadratic(a, w), a, w, (x, torch.zeros(len(x)))


def test_one_step_matches_closed_form():
    model, a, w, data = _quadratic()
    rho = 0.05
    g = a @ w
    expected = rho * g.norm() + 0.5 * rho**2 * (g @ a @ g) / (g @ g)
    result = sam_sharpness(model, mean_output, data, rho=rho)
    assert result.value == pytest.approx(float(expected), rel=1e-12)
    assert result.loss == pytest.approx(float(0.5 * w @ a @ w), rel=1e-14)
    assert (result.num_samples, result.num_groups, result.steps) == (1, 1, 1)


class NamedQuadratic(Quadratic):
    """``½ wᵀAw`` with ``w`` held by a parameter named ``weight`` (first half) and one
    named ``cls_token`` (second half): the official ASAM rule scales only the first."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__(a, w)
        del self.w
        self.weight = torch.nn.Parameter(w[:2].clone())
        self.cls_token = torch.nn.Parameter(w[2:].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = torch.cat([self.weight, self.cls_token]) - x
        return 0.5 * ((diff @ self.a) * diff).sum(dim=1)


@pytest.mark.parametrize(
    ("adaptive", "eta", "scaled"),
    [("weights", 0.01, [1.0, 1.0, 0.0, 0.0]), ("all", 0.0, [1.0] * 4), ("all", 0.3, [1.0] * 4)],
)
def test_adaptive_matches_the_official_asam_ball(adaptive, eta, scaled):
    _, a, w, data = _quadratic()
    model = NamedQuadratic(a, w)
    rho = 0.5
    g = a @ w
    mask = torch.tensor(scaled, dtype=torch.float64)
    t = mask * (w.abs() + eta) + (1 - mask)
    eps = rho * t**2 * g / (t * g).norm()
    given_eta = None if eta in (0.01, 0.0) else eta  # the forms' defaults when not given
    result = sam_sharpness(model, mean_output, data, rho=rho, adaptive=adaptive, eta=given_eta)
    assert result.value == pytest.approx(_rise(a, g, eps), rel=1e-12)
    assert result.adaptive == adaptive


def test_m_sharpness_averages_one_perturbation_per_sub_batch():
    samples = torch.randn(10, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model, a, w, data = _quadratic(samples)
    rho = 0.1
    expected = 0.0
    for part in samples.split(4):  # sizes 4, 4, 2
        g = a @ (w - part.mean(dim=0))
        expected += len(part) / 10 * _rise(a, g, rho * g / g.norm())
    result = sam_sharpness(model, mean_output, data, rho=rho, m=4)
    assert result.value == pytest.approx(expected, rel=1e-12)
    assert result.num_groups == 3
    # one ε for the whole data set is a different number
    g = a @ (w - samples.mean(dim=0))
    whole = sam_sharpness(model, mean_output, data, rho=rho)
    assert whole.value == pytest.approx(_rise(a, g, rho * g / g.norm()), rel=1e-12)
    assert whole.value != pytest.approx(expected, rel=1e-3)


def _trust_region_maximum(a: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """``max_{‖ε‖≤ρ} gᵀε + ½εᵀAε`` for SPD ``A``: ``ε = (μI − A)⁻¹g``, ``‖ε‖ = ρ``, μ > λmax,
    with μ found by bisection (independently of the code under test)."""
    lam, q = torch.linalg.eigh(a)
    c = q.T @ g
    low, high = float(lam[-1]) + 1e-12, float(lam[-1] + g.norm() / rho)
    for _ in range(200):
        mu = 0.5 * (low + high)
        if float((c / (mu - lam)).norm()) > rho:
            low = mu
        else:
            high = mu
    eps = q @ (c / (high - lam))
    return _rise(a, g, eps)


def test_projected_ascent_reaches_the_ball_maximum():
    model, a, w, data = _quadratic()
    rho = 1.0
    g = a @ w
    one_step = sam_sharpness(model, mean_output, data, rho=rho).value
    many = sam_sharpness(model, mean_output, data, rho=rho, steps=200).value
    best = _trust_region_maximum(a, g, rho)
    assert one_step < best - 1e-3  # the single step is visibly sub-optimal here
    assert many == pytest.approx(best, rel=1e-8)


def test_more_steps_never_report_less():
    model = make_mlp(batch_norm=True)
    data = make_data()
    values = [sam_sharpness(model, F.cross_entropy, data, rho=0.5, steps=s).value for s in (1, 3)]
    assert values[1] >= values[0]


def test_zero_gradient_and_zero_radius_give_zero():
    model, _, _, data = _quadratic()
    assert sam_sharpness(model, mean_output, data, rho=0.0).value == 0.0
    with torch.no_grad():
        model.w.zero_()
    assert sam_sharpness(model, mean_output, data, rho=0.05, steps=3).value == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -0.1}, "rho must be a finite number >= 0"),
        ({"rho": float("inf")}, "rho must be a finite number >= 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"m": 0}, "m must"),
        ({"eta": -1.0}, "eta must be a finite number >= 0"),
        ({"adaptive": True}, "adaptive='weights'"),
        ({"adaptive": "asam"}, "adaptive must be one of None, 'weights', 'all'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    model, _, _, data = _quadratic()
    with pytest.raises(ValueError, match=match):
        sam_sharpness(model, mean_output, data, **kwargs)
