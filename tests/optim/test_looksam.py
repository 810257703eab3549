"""LookSAM: one pass on reuse steps, the reused direction against a float64 closed form on
L(w) = ½ wᵀAw with SGD and AdamW, and its state in the checkpoint. The family contracts
(test_family_contract.py) also run with k = 2, across reuse steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatmin import SAM, LookSAM
from flatmin.optim.bn import running_stats_frozen
from tests.optim.helpers import (
    Quadratic,
    batches,
    bn_net,
    flat,
    grad_at,
    make_problem,
    snapshot,
    state_equal,
    train,
)


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
    assert [g["steps_done"] for g in opt.state_dict()["param_groups"]] == [7]


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


def g_v_of(state_dict):
    """The kept g_v of every parameter, in the state dict's numbering."""
    return [state_dict["state"][i]["g_v"] for i in sorted(state_dict["state"])]


def test_state_dict_has_torch_layout_with_g_v_per_parameter_and_counters_in_groups():
    model = bn_net()
    params = list(model.parameters())
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.05, momentum=0.9)
    sd = opt.state_dict()
    # Before the first step: the same layout, with zeros (a complete template for
    # torch.distributed.checkpoint, which loads into a fresh optimizer's state dict).
    assert set(sd) == {"state", "param_groups"}
    assert all(set(sd["state"][i]) == {"g_v"} for i in range(len(params)))
    assert all(not g_v.any() for g_v in g_v_of(sd))
    assert (sd["param_groups"][0]["steps_done"], sd["param_groups"][0]["g_v_norm"]) == (0, 0.0)
    assert not opt.is_reuse_step
    train(model, opt, batches(1))
    sd = opt.state_dict()
    assert set(sd["state"]) == set(range(len(params)))
    for i, p in enumerate(params):
        assert set(sd["state"][i]) == {"momentum_buffer", "g_v"}
        assert sd["state"][i]["g_v"].shape == p.shape
    group = sd["param_groups"][0]
    assert group["steps_done"] == 1 and opt.is_reuse_step
    g_v = torch.cat([t.flatten() for t in g_v_of(sd)])
    assert group["g_v_norm"].item() == pytest.approx(g_v.norm().item(), rel=1e-6)
    # Only the base optimizer's entries live in the shared optimizer state.
    assert opt.base_optimizer.state is opt.state
    assert all(set(s) == {"momentum_buffer"} for s in opt.state.values())
    assert all("steps_done" not in g for g in opt.param_groups)


def test_torch_state_dict_hooks_see_the_method_state():
    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.05)
    seen, loaded = [], []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd["state"][0])))
    opt.register_load_state_dict_post_hook(lambda o: loaded.append(o.base_optimizer.state))
    train(model, opt, batches(1))
    opt.load_state_dict(opt.state_dict())
    assert seen == [["g_v"]]  # SGD without momentum keeps no state of its own
    assert loaded == [opt.state] and not opt.state  # loaded, shared, no g_v left in it
    assert opt.is_reuse_step


def test_resume_with_adam_leaves_adam_its_own_state():
    """Adam initialises a parameter's state only while it is empty: g_v must never be in
    the live state, also right after loading a state dict taken at the first step."""
    model = bn_net()
    opt = LookSAM(model.parameters(), torch.optim.Adam, k=2, lr=1e-3)
    train(model, opt, batches(1))
    resumed = LookSAM(bn_net().parameters(), torch.optim.Adam, k=2, lr=1e-3)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in resumed.state.values())
    assert state_equal(resumed.state_dict(), opt.state_dict())


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
    kept = [t.clone() for t in g_v_of(opt.state_dict())]
    weights = snapshot(model)
    assert looksam_amp_step(model, opt, scaler, x, y, poison_second=True)
    assert same_tensors(snapshot(model).values(), weights.values())  # the scaler skipped it
    assert same_tensors(g_v_of(opt.state_dict()), kept)
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
    before = [t.clone() for t in g_v_of(saved)]
    train(other, resumed, data[3:6])  # reuse, full, reuse: the full step updates g_v
    assert same_tensors(before, g_v_of(saved))
