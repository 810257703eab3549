"""GSAM against SAM (α = 0), a float64 closed form on L(w) = ½ wᵀAw, and its ρ schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatmin import GSAM, SAM
from flatmin.optim.gsam import scheduled_rho
from tests.optim.helpers import (
    LR,
    Quadratic,
    batches,
    bn_net,
    flat,
    grad_at,
    make_problem,
    one_step,
    snapshot,
    state_equal,
    train,
)


def test_alpha_zero_with_constant_rho_is_sam_bit_for_bit():
    data = batches(6)
    runs = {}
    for name in ("sam", "gsam"):
        model = bn_net()
        kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
        if name == "sam":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, **kw)
        else:
            opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.07, alpha=0.0, rho_min=0.07, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for x, y in data:
            train(model, opt, [(x, y)])
            sched.step()
        runs[name] = (snapshot(model), opt.base_optimizer.state_dict()["state"])
    assert all(torch.equal(a, b) for a, b in zip(runs["sam"][0].values(), runs["gsam"][0].values()))
    assert state_equal(runs["sam"][1], runs["gsam"][1])


@pytest.mark.parametrize("alpha", [0.4, 1.3])
def test_update_direction_matches_closed_form(alpha):
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=alpha, rho_min=0.1, lr=LR)
    one_step(opt, model)
    g = grad_at(A, v)
    g_s = grad_at(A, v + 0.1 * g / g.norm())
    g_perp = g - (g @ g_s) / (g_s @ g_s) * g_s
    assert abs(g_perp @ g_s) < 1e-12  # the closed form itself: g_⊥ ⟂ g_s
    torch.testing.assert_close(flat(model), v - LR * (g_s - alpha * g_perp), rtol=0, atol=1e-14)


def test_stable_renormalizes_the_final_direction_to_the_clean_gradient_norm():
    w, b, A = make_problem()
    models, alpha, rho = {}, 1.3, 0.5
    for stable in (False, True):
        models[stable] = Quadratic(w, b, A)
        opt = GSAM(
            models[stable].parameters(),
            torch.optim.SGD,
            rho=rho,
            alpha=alpha,
            rho_min=rho,
            stable=stable,
            lr=LR,
        )
        one_step(opt, models[stable])
    v = flat(Quadratic(w, b, A))
    g = grad_at(A, v)
    g_s = grad_at(A, v + rho * g / g.norm())
    d = g_s - alpha * (g - (g @ g_s) / (g_s @ g_s) * g_s)
    gamma = g.norm() / d.norm()
    assert abs(gamma - 1) > 0.1
    torch.testing.assert_close(flat(models[True]), v - LR * gamma * d, rtol=0, atol=1e-14)
    torch.testing.assert_close(flat(models[False]), v - LR * d, rtol=0, atol=1e-14)


def test_stable_cap_limits_the_factor_to_one():
    w, b, A = make_problem()
    model = Quadratic(w, b, -A)  # concave: the ascent step shrinks the gradient
    v = flat(model)
    rho, alpha = 0.1, 0.1
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, rho_min=rho, lr=LR,
               stable=True, stable_cap=True)  # fmt: skip
    one_step(opt, model)
    g = grad_at(-A, v)
    g_s = grad_at(-A, v + rho * g / g.norm())
    d = g_s - alpha * (g - (g @ g_s) / (g_s @ g_s) * g_s)
    assert g.norm() / d.norm() > 1
    torch.testing.assert_close(flat(model), v - LR * d, rtol=0, atol=1e-14)


def test_clean_gradient_buffer_is_reused_and_holds_each_step_s_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt = GSAM(net.parameters(), torch.optim.SGD, rho=0.1, alpha=0.5, lr=0.1)
    buffers, direction = [], []
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        g = [p.grad.clone() for p in net.parameters()]
        opt.first_step(zero_grad=True)
        nn.functional.mse_loss(net(x), y).backward()
        g_s = [p.grad.clone() for p in net.parameters()]
        clean = opt._clean_grads[0]
        assert all(torch.equal(a, b) for a, b in zip(clean, g))  # this step's g, not a stale one
        buffers.append([t.data_ptr() for t in clean])
        opt.second_step()
        inner = sum((a * b).sum() for a, b in zip(g, g_s))
        coef = inner / sum((b * b).sum() for b in g_s)
        expected = [(1 + 0.5 * coef) * b - 0.5 * a for a, b in zip(g, g_s)]
        direction.append(all(torch.allclose(p.grad, e) for p, e in zip(net.parameters(), expected)))
    assert buffers[0] == buffers[1] == buffers[2]
    assert all(direction)


def test_rho_follows_the_learning_rate_of_a_torch_scheduler():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.05, lr=0.5)
    factors = [1.0, 0.5, 0.1, 0.0, 1.5]  # the last one goes beyond lr_max: ρ stays at ρ_max
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factors[min(t, len(factors) - 1)])
    for factor in factors:
        lr = 0.5 * factor
        expected = 0.05 + 0.15 * min(lr / 0.5, 1.0)
        opt.zero_grad()
        model().backward()
        before = flat(model)
        opt.first_step(zero_grad=True)
        radius = (flat(model) - before).norm().item()
        assert radius == pytest.approx(expected, rel=1e-12)
        model().backward()
        opt.second_step(zero_grad=True)
        sched.step()


def test_lr_range_and_per_group_defaults():
    lin = nn.Linear(3, 2)
    opt = GSAM(
        [{"params": [lin.weight], "lr": 0.4}, {"params": [lin.bias], "rho": 0.1}],
        torch.optim.SGD,
        rho=0.3,
        lr=0.2,
        lr_min=0.1,
    )
    first, second = opt.param_groups
    assert (first["rho_max"], first["lr_max"], first["lr_min"]) == (0.3, 0.4, 0.1)
    assert (second["rho_max"], second["lr_max"]) == (0.1, 0.2)
    first["lr"], second["lr"] = 0.25, 0.15
    opt._before_first_step()
    assert first["rho"] == pytest.approx(0.3 * (0.25 - 0.1) / (0.4 - 0.1))
    assert second["rho"] == pytest.approx(0.1 * (0.15 - 0.1) / (0.2 - 0.1))


def test_scheduled_rho_is_constant_when_the_lr_range_or_rho_range_is_empty():
    assert scheduled_rho(0.01, 0.3, 0.1, lr_max=0.5, lr_min=0.5) == 0.3
    assert scheduled_rho(0.01, 0.3, 0.3, lr_max=0.5, lr_min=0.0) == 0.3
    assert scheduled_rho(torch.tensor(0.25), 0.3, 0.1, 0.5, 0.0).item() == pytest.approx(0.2)


def test_added_param_group_gets_the_schedule():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = GSAM(a.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.05, lr=0.1)
    opt.add_param_group({"params": b.parameters(), "lr": 0.3})
    group = opt.param_groups[-1]
    assert (group["rho_max"], group["rho_min"], group["lr_max"]) == (0.2, 0.05, 0.3)
    assert opt.base_optimizer.param_groups is opt.param_groups


def test_schedule_settings_are_checkpointed():
    model = bn_net()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.05, lr_max=1.0, lr=0.5)
    train(model, opt, batches(1))
    saved = opt.state_dict()["param_groups"][0]
    assert (saved["rho_max"], saved["rho_min"], saved["lr_max"]) == (0.2, 0.05, 1.0)
    assert saved["rho"] == pytest.approx(0.05 + 0.15 * 0.5)


class TestBadInput:
    @pytest.mark.parametrize(
        "group, match",
        [
            ({"rho": float("nan")}, "rho(_max)? must be a finite number >= 0"),
            ({"rho": float("inf")}, "rho(_max)? must be a finite number >= 0"),
            ({"rho": -0.1}, "rho(_max)? must be a finite number >= 0"),
            ({"rho_max": float("inf")}, "rho_max must be a finite number >= 0"),
            ({"rho_min": float("nan")}, "rho_min must be a finite number >= 0"),
            ({"lr_min": -1.0}, "lr_min must be a finite number >= 0"),
            ({"lr_max": float("nan")}, "lr_max must be a finite number"),
        ],
    )
    @pytest.mark.parametrize("where", ["constructor", "added"])
    def test_bad_schedule_in_a_group(self, group, match, where):
        net = nn.Linear(2, 2)
        if where == "constructor":
            groups = [{"params": [net.weight]}, {"params": [net.bias], **group}]
            with pytest.raises(ValueError, match=match):
                GSAM(groups, torch.optim.SGD, lr=0.1)
        else:
            opt = GSAM([net.weight], torch.optim.SGD, lr=0.1)
            with pytest.raises(ValueError, match=match):
                opt.add_param_group({"params": [net.bias], **group})
            assert len(opt.param_groups) == 1

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(alpha=-0.1), "alpha must be a finite number >= 0"),
            (dict(rho=0.05, rho_min=0.1), "rho_min .* must not exceed rho"),
            (dict(rho_min=-0.01), "rho_min must be a finite number >= 0"),
            (dict(lr_max=0.01, lr_min=0.1), "lr_max must be a finite number >= 0.1"),
            (dict(rho=-1.0), "rho must be a finite number >= 0"),
        ],
    )
    def test_rejected_settings(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            GSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **kwargs)
