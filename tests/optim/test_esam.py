"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection against a
float64 closed form on per-sample least squares, its per-sample closure, BatchNorm,
restore on error, bit-exact resume and bad input."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from flatmin import ESAM, SAM
from tests.helpers import assert_resumes_bit_exactly
from tests.optim.helpers import (
    BASES,
    batches,
    bn_net,
    resume_parts,
    snapshot,
    state_equal,
    steps_over,
    train,
    train_per_sample,
)

DT = torch.float64


class LeastSquares(nn.Module):
    """Per-sample L_i(w) = ½ (x_iᵀ w − y_i)², with w split over several tensors."""

    def __init__(self, sizes=(3, 2, 4, 1, 2), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.parts = nn.ParameterList(
            nn.Parameter(torch.randn(n, generator=g, dtype=DT)) for n in sizes
        )

    def weight(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parts])

    def forward(self, x, y):
        return 0.5 * (x @ torch.cat(list(self.parts)) - y).square()


def least_squares_data(batch=10, dim=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g, dtype=DT), torch.randn(batch, generator=g, dtype=DT)


def per_sample_closure(model, x, y, log=None):
    def closure(indices=None):
        if log is not None:
            log.append((indices, torch.is_grad_enabled()))
        if indices is None:
            return model(x, y)
        return model(x[indices], y[indices])

    return closure


def expected_esam_step(model, x, y, subset, rho, beta, gamma, lr):
    """One ESAM step with SGD in float64, written from the paper's rules."""
    w = model.weight()
    mask = torch.cat(
        [torch.full((p.numel(),), float(keep), dtype=DT) for p, keep in zip(model.parts, subset)]
    )
    g = x.T @ (x @ w - y) / len(y)
    g_sel = mask * g
    eps = rho * g_sel / (beta * g_sel.norm()) if g_sel.norm() > 0 else torch.zeros_like(w)
    rise = 0.5 * (x @ (w + eps) - y).square() - 0.5 * (x @ w - y).square()
    chosen = torch.topk(rise, max(1, math.ceil(gamma * len(y)))).indices
    xs, ys = x[chosen], y[chosen]
    g_s = xs.T @ (xs @ (w + eps) - ys) / len(ys)
    return w - lr * g_s, set(chosen.tolist())


@pytest.mark.parametrize("beta, gamma", [(0.5, 0.3), (0.6, 0.5), (1.0, 1.0), (0.4, 1.0)])
def test_steps_match_closed_form(beta, gamma):
    model = LeastSquares()
    x, y = least_squares_data()
    rho, lr = 0.3, 0.05
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=rho, beta=beta, gamma=gamma, seed=3, lr=lr)
    mixed = 0
    for _ in range(6):
        subset = opt.perturbed_subset()
        mixed += 0 < sum(subset) < len(subset)
        expected, chosen = expected_esam_step(model, x, y, subset, rho, beta, gamma, lr)
        log = []
        opt.zero_grad()
        opt.step(per_sample_closure(model, x, y, log))
        torch.testing.assert_close(model.weight(), expected, rtol=0, atol=1e-13)
        if gamma < 1:
            (_, first_grad), (_, second_grad), (indices, third_grad) = log
            assert first_grad and not second_grad and third_grad  # selection pass: no graph
            assert set(indices.tolist()) == chosen
        else:
            assert [i for i, _ in log] == [None, None]
    assert beta == 1.0 or mixed > 0, "the seed should give steps with a partial subset"


def test_beta_and_gamma_one_is_sam_bit_for_bit():
    data = batches(5)
    a, b = bn_net(), bn_net()
    kw = dict(lr=0.05, momentum=0.9)
    train(a, SAM(a.parameters(), torch.optim.SGD, rho=0.05, **kw), data)
    train(b, ESAM(b.parameters(), torch.optim.SGD, rho=0.05, beta=1.0, gamma=1.0, **kw), data)
    assert all(torch.equal(p, q) for p, q in zip(snapshot(a).values(), snapshot(b).values()))


def test_subset_draws_have_probability_beta_and_are_fixed_by_seed_and_step():
    params = [nn.Parameter(torch.zeros(1)) for _ in range(50)]
    opt = ESAM(params, torch.optim.SGD, beta=0.3, seed=11, lr=0.1)
    draws = []
    for step in range(40):
        opt.steps_done = step
        draws.append(opt.perturbed_subset())
    share = sum(map(sum, draws)) / (40 * 50)
    assert abs(share - 0.3) < 0.03  # 2000 Bernoulli(0.3) draws: σ ≈ 0.01
    assert len({tuple(d) for d in draws}) == 40
    again = ESAM(params, torch.optim.SGD, beta=0.3, seed=11, lr=0.1)
    again.steps_done = 17
    assert again.perturbed_subset() == draws[17]
    other = ESAM(params, torch.optim.SGD, beta=0.3, seed=12, lr=0.1)
    assert [other.perturbed_subset()] != draws[:1]


def test_unperturbed_tensors_get_no_first_pass_gradient_and_are_unfrozen_after():
    model = LeastSquares()
    x, y = least_squares_data()
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, seed=3, lr=0.05)
    subset = opt.perturbed_subset()
    assert 0 < sum(subset) < len(subset)
    with opt.unperturbed_frozen():
        assert [p.requires_grad for p in model.parts] == subset
        model(x, y).mean().backward()
    assert [p.grad is not None for p in model.parts] == subset
    assert all(p.requires_grad for p in model.parts)
    with pytest.raises(RuntimeError, match="inside"), opt.unperturbed_frozen():
        raise RuntimeError("inside")
    assert all(p.requires_grad for p in model.parts)


def test_freezing_unperturbed_tensors_changes_no_result():
    data = batches(5)
    runs = []
    for freeze in (True, False):
        model = bn_net()
        opt = ESAM(
            model.parameters(),
            torch.optim.SGD,
            beta=0.5,
            seed=5,
            lr=0.05,
            momentum=0.9,
            freeze_unperturbed=freeze,
        )
        train_per_sample(model, opt, data)
        runs.append(snapshot(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_batchnorm_statistics_move_once_with_data_selection():
    model = bn_net()
    opt = ESAM(model.parameters(), torch.optim.SGD, gamma=0.5, seed=0, lr=0.1)
    x, y = batches(1)[0]
    reference = copy.deepcopy(model)
    reference(x)
    train_per_sample(model, opt, [(x, y)])
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("failing_call", [2, 3])  # the selection pass, the subset pass
def test_weights_and_state_restored_when_a_later_pass_raises(failing_call):
    model = bn_net()
    opt = ESAM(model.parameters(), torch.optim.SGD, gamma=0.5, seed=0, lr=0.1, momentum=0.9)
    train_per_sample(model, opt, batches(2))
    weights, state = snapshot(model), copy.deepcopy(opt.state_dict())
    subset = opt.perturbed_subset()
    x, y = batches(3)[2]
    calls = []

    def closure(indices=None):
        calls.append(indices)
        if len(calls) == failing_call:
            raise RuntimeError("pass failed")
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return nn.functional.cross_entropy(model(xb), yb, reduction="none")

    with pytest.raises(RuntimeError, match="pass failed"):
        opt.step(closure, model=model)
    now = snapshot(model)
    assert all(
        torch.equal(now[k], weights[k]) for k in now if "running" not in k and "num" not in k
    )
    assert state_equal(opt.state_dict(), state)
    assert opt.perturbed_subset() == subset  # the retried step draws the same subset
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("base", BASES)
def test_resume_with_data_selection_is_bit_exact(base, tmp_path):
    make = resume_parts(
        lambda params, base_cls, **kw: ESAM(params, base_cls, seed=4, **kw),
        base,
        # another seed for the resumed optimizer: the seed must come from the checkpoint
        resumed_optimizer=lambda params, base_cls, **kw: ESAM(params, base_cls, seed=123, **kw),
    )
    data = batches(8)
    assert_resumes_bit_exactly(
        make,
        steps_over(data, train_per_sample),
        epochs=8,  # optimizer steps here
        stop_after=5,
        checkpoint=tmp_path / "checkpoint.pt",
    )


def test_state_dict_keeps_the_counter_and_the_seed_in_every_group():
    net = nn.Linear(4, 2)
    groups = [{"params": [net.weight]}, {"params": [net.bias], "lr": 0.01}]
    opt = ESAM(groups, torch.optim.SGD, seed=7, gamma=1.0, lr=0.1)
    x = torch.randn(5, 4)
    for _ in range(3):
        opt.step(lambda: (loss := net(x).square().mean()).backward() or loss)
    sd = opt.state_dict()
    assert [(g["steps_done"], g["seed"]) for g in sd["param_groups"]] == [(3, 7), (3, 7)]
    assert all("seed" not in g for g in opt.param_groups)
    with pytest.raises(ValueError, match=r"lack \['steps_done', 'seed'\]"):
        opt.load_state_dict(SAM(groups, torch.optim.SGD, lr=0.1).state_dict())


def test_scalar_closure_with_data_selection_warns_once_and_uses_every_sample():
    model = bn_net()
    opt = ESAM(model.parameters(), torch.optim.SGD, gamma=0.5, seed=0, lr=0.1)
    with pytest.warns(UserWarning, match="per-sample losses"):
        train(model, opt, batches(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, batches(1))


def test_clipping_covers_the_unperturbed_tensors():
    model = LeastSquares()
    x, y = least_squares_data()
    opt = ESAM(
        model.parameters(),
        torch.optim.SGD,
        beta=0.5,
        gamma=1.0,
        seed=3,
        lr=1.0,
        max_grad_norm=1e-3,
    )
    assert 0 < sum(opt.perturbed_subset()) < len(model.parts)
    before = model.weight()
    opt.step(per_sample_closure(model, x, y))
    assert (model.weight() - before).norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_select_samples_keeps_ceil_gamma_b_of_the_largest_rises():
    opt = ESAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, gamma=0.3, lr=0.1)
    before = torch.zeros(7)
    after = torch.tensor([0.5, -1.0, 3.0, 0.1, 2.0, 0.0, 1.0])
    assert sorted(opt.select_samples(before, after).tolist()) == [2, 4, 6]  # ⌈0.3·7⌉ = 3
    assert opt.select_samples(torch.zeros(1), torch.ones(1)).tolist() == [0]
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.select_samples(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("others", [-1e6, 1e6])
def test_selection_over_processes_weights_the_chosen_rows_by_w_over_s(others):
    """With ``sample_gather`` (sam_step on an FSDP2 model sets it) the ⌈γ·B⌉ largest rises
    of the global batch are chosen; here this process is rank 1 of 2 and the other rank's
    rises are far below (all four of ours chosen, weight 2/4) or far above (none of ours:
    one row with weight 0, so the backward still runs and moves nothing)."""
    model = LeastSquares()
    x, y = least_squares_data(batch=4)
    lr = 0.05
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.3, beta=1.0, gamma=0.5, seed=3, lr=lr)
    opt.sample_gather = lambda rise: (torch.cat([torch.full((4,), others, dtype=DT), rise]), 4, 2)
    if others < 0:  # SGD on (2/4)·Σ_4 ∇ℓ_i = 2 · mean: the step of lr·2 on all rows
        expected, _ = expected_esam_step(model, x, y, [True] * 5, 0.3, 1.0, 1.0, 2 * lr)
    else:
        expected = model.weight()
    log = []
    opt.step(per_sample_closure(model, x, y, log))
    rows = log[-1][0]
    assert sorted(rows.tolist()) == ([0, 1, 2, 3] if others < 0 else [0])
    torch.testing.assert_close(model.weight(), expected, rtol=0, atol=1e-13)


class TestBadInput:
    @pytest.mark.parametrize("name", ["beta", "gamma"])
    @pytest.mark.parametrize(
        "value, error",
        [(0.0, ValueError), (-0.2, ValueError), (1.5, ValueError), (True, TypeError)],
    )
    def test_fractions_outside_zero_one(self, name, value, error):
        expected = rf"{name} must be a finite number > 0.0 and <= 1.0 \(the .*ESAM's default"
        with pytest.raises(error, match=expected):
            ESAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **{name: value})
