"""LookSAM: one pass on reuse steps, the reused direction against a float64 closed form on
L(w) = ½ wᵀAw with SGD and AdamW, its state in the checkpoint, and the family contracts
run with k = 2 so that they cross reuse steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatmin import SAM, LookSAM
from flatmin.optim.bn import running_stats_frozen
from tests.optim import test_family_contract as contract
from tests.optim.test_family_contract import batches, bn_net, snapshot, state_equal, train
from tests.optim.test_sam import Quadratic, flat, grad_at, make_problem

LOOKSAM_K2 = "looksam_k2"


@pytest.fixture
def family_with_k2(monkeypatch):
    """The lead's contract tests, pointed at LookSAM with k = 2 (full, reuse, full, …)."""
    monkeypatch.setitem(
        contract.FAMILY,
        LOOKSAM_K2,
        lambda params, base, **kw: LookSAM(params, base, rho=0.05, k=2, alpha=0.7, **kw),
    )


@pytest.mark.parametrize("base", contract.BASES)
def test_resume_across_reuse_steps_is_bit_exact(family_with_k2, base, tmp_path):
    contract.test_resume_is_bit_exact(LOOKSAM_K2, base, tmp_path)  # checkpoint before a reuse step


def test_weights_restored_when_a_full_steps_second_pass_raises(family_with_k2):
    contract.test_weights_restored_when_second_pass_raises(LOOKSAM_K2)


def test_reuse_steps_call_the_closure_once():
    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=3, lr=0.05)
    calls, reuse = [], []
    for x, y in batches(7):
        opt.zero_grad()
        reuse.append(opt.is_reuse_step)
        before = len(calls)

        def closure(x=x, y=y):
            calls.append(1)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure, model=model)
        assert len(calls) - before == (1 if reuse[-1] else 2)
    assert reuse == [False, True, True, False, True, True, False]
    assert len(calls) == 3 * 2 + 4 * 1
    assert opt.state_dict()["method"]["steps_done"] == 7


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_full_and_reuse_steps_match_closed_form(base):
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    rho, alpha, k = 0.2, 0.7, 3
    base_cls, kw = (
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9))
        if base == "sgd"
        else (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1))
    )
    opt = LookSAM(model.parameters(), base_cls, rho=rho, k=k, alpha=alpha, **kw)
    ref_param = nn.Parameter(flat(model).clone())
    ref_opt = base_cls([ref_param], **kw)
    g_v = None
    for t in range(7):
        v = ref_param.detach().clone()
        g = grad_at(A, v)
        if t % k == 0:
            g_s = grad_at(A, v + rho * g / g.norm())
            g_v = g_s - (g @ g_s) / (g @ g) * g
            direction = g_s
        else:
            direction = g + alpha * g.norm() / g_v.norm() * g_v
        ref_param.grad = direction
        ref_opt.step()
        opt.zero_grad()
        opt.step(lambda: (loss := model()).backward() or loss)
        torch.testing.assert_close(flat(model), ref_param.detach(), rtol=0, atol=1e-13)


def test_stable_renormalizes_full_and_reuse_directions_to_the_clean_gradient_norm():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    rho, alpha, k, lr = 0.5, 0.7, 2, 0.1
    opt = LookSAM(
        model.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, stable=True, lr=lr
    )
    v = flat(model)
    gammas = []
    for t in range(5):
        g = grad_at(A, v)
        if t % k == 0:
            g_s = grad_at(A, v + rho * g / g.norm())
            g_v = g_s - (g @ g_s) / (g @ g) * g
            d = g_s
        else:
            d = g + alpha * g.norm() / g_v.norm() * g_v
        gammas.append(g.norm() / d.norm())
        v = v - lr * gammas[-1] * d
        opt.zero_grad()
        opt.step(lambda: (loss := model()).backward() or loss)
        torch.testing.assert_close(flat(model), v, rtol=0, atol=1e-13)
    assert all(gamma < 0.97 for gamma in gammas)  # every step is rescaled


def test_explicit_loop_equals_the_closure_loop_bit_for_bit():
    data = batches(6)
    closure_model = bn_net()
    closure_opt = LookSAM(closure_model.parameters(), torch.optim.SGD, k=3, lr=0.05, momentum=0.9)
    train(closure_model, closure_opt, data)

    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=3, lr=0.05, momentum=0.9)
    second_passes = []
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        second_passes.append(opt.is_perturbed)
        if opt.is_perturbed:
            with running_stats_frozen(model):
                nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step()
    assert second_passes == [True, False, False, True, False, False]
    assert all(
        torch.equal(a, b)
        for a, b in zip(snapshot(model).values(), snapshot(closure_model).values())
    )
    assert state_equal(opt.state_dict(), closure_opt.state_dict())


def test_k_one_is_sam_bit_for_bit():
    data = batches(4)
    a, b = bn_net(), bn_net()
    train(a, SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9), data)
    train(b, LookSAM(b.parameters(), torch.optim.SGD, rho=0.05, k=1, lr=0.05, momentum=0.9), data)
    assert all(torch.equal(p, q) for p, q in zip(snapshot(a).values(), snapshot(b).values()))


def test_batchnorm_statistics_move_once_on_full_and_reuse_steps():
    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1)
    for step, (x, y) in enumerate(batches(4), start=1):
        reference = copy.deepcopy(model)
        reference(x)  # the one training-mode forward at w this step may count
        train(model, opt, [(x, y)])
        assert torch.equal(model[1].running_mean, reference[1].running_mean)
        assert torch.equal(model[1].running_var, reference[1].running_var)
        assert model[1].num_batches_tracked.item() == step


def test_state_dict_holds_counter_and_reused_direction():
    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.05)
    assert opt.state_dict()["method"]["g_v"] == [None] * len(list(model.parameters()))
    train(model, opt, batches(1))
    method = opt.state_dict()["method"]
    assert method["steps_done"] == 1 and opt.is_reuse_step
    g_v = torch.cat([t.flatten() for t in method["g_v"]])
    assert method["g_v_norm"].item() == pytest.approx(g_v.norm().item(), rel=1e-6)


def test_loading_a_state_of_another_model_changes_nothing():
    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.05, momentum=0.9)
    train(model, opt, batches(3))
    other = nn.Linear(6, 4)
    other_opt = LookSAM(other.parameters(), torch.optim.SGD, k=2, lr=0.05, momentum=0.9)
    other_opt.step(lambda: (loss := other(torch.randn(3, 6)).square().mean()).backward() or loss)
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="same model and param groups"):
        opt.load_state_dict(other_opt.state_dict())
    assert state_equal(opt.state_dict(), saved)


class TestBadInput:
    @pytest.mark.parametrize(
        "k, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)]
    )
    def test_k_must_be_a_positive_integer(self, k, error):
        with pytest.raises(error, match="k must be an integer >= 1"):
            LookSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, k=k, lr=0.1)

    def test_negative_alpha(self):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
            LookSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, alpha=-0.5, lr=0.1)


def looksam_amp_step(model, opt, scaler, x, y, poison_second=False):
    """One LookSAM step with a GradScaler, written out; returns whether it had two passes."""
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    two_passes = opt.is_perturbed
    if two_passes:
        loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if poison_second else 1.0)
        scaler.scale(loss).backward()
        opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    return two_passes


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def test_grad_scaler_steps_match_unscaled_steps():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    plain, scaled = small_model(), small_model()
    opt_plain = LookSAM(plain.parameters(), torch.optim.SGD, k=2, lr=0.1, momentum=0.9)
    opt_scaled = LookSAM(scaled.parameters(), torch.optim.SGD, k=2, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(4):
        train(plain, opt_plain, [(x, y)])
        looksam_amp_step(scaled, opt_scaled, scaler, x, y)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_non_finite_full_step_is_skipped_and_keeps_the_previous_g_v():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    model = small_model()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert looksam_amp_step(model, opt, scaler, x, y)  # full step: g_v from here
    assert not looksam_amp_step(model, opt, scaler, x, y)  # reuse step
    kept = [t.clone() for t in opt.state_dict()["method"]["g_v"]]
    weights = snapshot(model)
    assert looksam_amp_step(model, opt, scaler, x, y, poison_second=True)
    assert same_tensors(snapshot(model).values(), weights.values())  # the scaler skipped it
    assert same_tensors(opt.state_dict()["method"]["g_v"], kept)
    assert not looksam_amp_step(model, opt, scaler, x, y)  # reuse step with the kept g_v
    assert all(torch.isfinite(p).all() for p in model.parameters())


def same_tensors(a, b):
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def test_kept_direction_is_updated_in_place_and_a_loaded_state_is_copied():
    data = batches(6)
    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=2, alpha=0.7, lr=0.05)
    train(model, opt, data[:1])  # one full step: g_v is kept
    slots = {p: t.data_ptr() for p, t in opt._g_v.items()}
    first = {p: t.clone() for p, t in opt._g_v.items()}
    train(model, opt, data[1:3])  # a reuse step, then the next full step
    assert {p: t.data_ptr() for p, t in opt._g_v.items()} == slots
    assert not all(torch.equal(first[p], t) for p, t in opt._g_v.items())

    saved = copy.deepcopy(opt.state_dict())
    other = bn_net()
    other.load_state_dict(model.state_dict())
    resumed = LookSAM(other.parameters(), torch.optim.SGD, rho=0.05, k=2, alpha=0.7, lr=0.05)
    resumed.load_state_dict(saved)
    before = [t.clone() for t in saved["method"]["g_v"]]
    train(other, resumed, data[3:6])  # reuse, full, reuse: the full step updates g_v
    assert all(torch.equal(a, b) for a, b in zip(before, saved["method"]["g_v"]))
