"""step(closure): the model given once, GradScaler, hooks and gradients after the step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatmin import ESAM, SAM
from flatmin.optim.bn import running_stats_frozen
from tests.optim.helpers import FAMILY, batches, bn_net, same, snapshot, state_equal


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", FAMILY)
def test_model_given_to_the_constructor_keeps_batchnorm_to_the_first_pass(name):
    """What a framework calling optimizer.step(closure) gets: no model= at the call."""
    data = batches(3)
    runs = {}
    for where in ("constructor", "step"):
        model = bn_net()
        kw = {"model": model} if where == "constructor" else {}
        opt = FAMILY[name](model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, **kw)
        for x, y in data:
            opt.zero_grad()
            opt.step(_closure(model, x, y), **({} if kw else {"model": model}))
        runs[where] = snapshot(model)
    assert same(runs["constructor"], runs["step"])
    assert runs["constructor"]["1.num_batches_tracked"].item() == len(data)


def test_model_at_the_step_overrides_the_constructor_s():
    model, other = bn_net(), bn_net()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, model=other)
    x, y = batches(1)[0]
    opt.step(_closure(model, x, y), model=model)
    assert model[1].num_batches_tracked.item() == 1


def test_without_a_model_both_passes_move_the_statistics():
    """The control: the constructor's model= is what keeps the second pass out."""
    model = bn_net()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    x, y = batches(1)[0]
    opt.step(_closure(model, x, y))
    assert model[1].num_batches_tracked.item() == 2


def test_model_must_be_a_module():
    net = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"model must be the nn.Module being trained .*, got list"):
        SAM(net.parameters(), torch.optim.SGD, lr=0.1, model=[net])


@pytest.mark.parametrize("name", FAMILY)
def test_step_leaves_no_gradients(name):
    model = bn_net()
    opt = FAMILY[name](model.parameters(), torch.optim.SGD, lr=0.05, model=model)
    x, y = batches(1)[0]
    opt.step(_closure(model, x, y))
    assert all(p.grad is None for p in model.parameters())


def test_step_hooks_see_one_step_per_closure_step():
    model = bn_net()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, model=model)
    calls = {"sam": 0, "base": 0}
    opt.register_step_post_hook(lambda *a: calls.__setitem__("sam", calls["sam"] + 1))
    opt.base_optimizer.register_step_post_hook(
        lambda *a: calls.__setitem__("base", calls["base"] + 1)
    )
    for x, y in batches(3):
        opt.step(_closure(model, x, y))
    assert calls == {"sam": 3, "base": 3}


# -- GradScaler through step(closure, grad_scaler=) ---------------------------------------


def _scaled_closure(model, x, y, scaler, poison=None):
    calls = []

    def closure():
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        factor = float("inf") if poison == len(calls) else 1.0
        scaler.scale(loss * factor).backward()
        return loss

    return closure


def _explicit_scaled_step(model, opt, x, y, scaler, poison=None):
    """The README's GradScaler recipe with the explicit passes."""
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss * (float("inf") if poison == 1 else 1.0)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with torch.autocast("cpu", dtype=torch.float16), running_stats_frozen(model):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss * (float("inf") if poison == 2 else 1.0)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)


@pytest.mark.parametrize("poison", [None, 1, 2], ids=["finite", "inf_first", "inf_second"])
def test_step_with_a_grad_scaler_equals_the_explicit_passes(poison):
    data = batches(3)
    runs = []
    for drive in ("closure", "explicit"):
        model = bn_net()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, model=model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        for i, (x, y) in enumerate(data):
            bad = poison if i == 2 else None
            if i == 2:
                params = [p.detach().clone() for p in model.parameters()]
                state = copy.deepcopy(opt.state_dict())
            if drive == "closure":
                opt.step(_scaled_closure(model, x, y, scaler, bad), grad_scaler=scaler)
            else:
                _explicit_scaled_step(model, opt, x, y, scaler, bad)
            scaler.update()
        runs.append((snapshot(model), opt.state_dict(), scaler.get_scale()))
        skipped = all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        assert skipped == (poison is not None)
        if poison is not None:  # only BN statistics moved (in the first pass)
            assert state_equal(opt.state_dict(), state)
        assert not opt.is_perturbed
    (w1, s1, scale1), (w2, s2, scale2) = runs
    assert same(w1, w2) and state_equal(s1, s2) and scale1 == scale2


def test_esam_per_sample_closure_with_a_grad_scaler_matches_the_unscaled_step():
    data = batches(3)
    runs = []
    for scaled in (False, True):
        model = bn_net()
        opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.5, seed=0, lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        for x, y in data:

            def closure(indices=None, model=model, x=x, y=y):
                xb, yb = (x, y) if indices is None else (x[indices], y[indices])
                return nn.functional.cross_entropy(model(xb), yb, reduction="none")

            opt.step(closure, model=model, grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
