"""SAM with torch.amp.GradScaler: one unscale per step, and non-finite passes skip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatmin import SAM


class CountingScaler(torch.amp.GradScaler):
    """A real GradScaler that also counts its unscale_ calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unscale_calls = 0

    def unscale_(self, optimizer):
        self.unscale_calls += 1
        return super().unscale_(optimizer)


def setup(seed=0, **sam_kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **sam_kwargs)
    return model, opt


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def amp_step(model, opt, scaler, x, y, poison_first=False, poison_second=False):
    loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if poison_first else 1.0)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    loss2 = nn.functional.cross_entropy(model(x), y) * (float("inf") if poison_second else 1.0)
    scaler.scale(loss2).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()


@pytest.mark.parametrize("normalize", [True, False])
def test_scaled_step_matches_the_unscaled_step(normalize):
    x, y = data()
    plain, opt_plain = setup(normalize=normalize)
    scaled, opt_scaled = setup(normalize=normalize)
    scaler = CountingScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt_plain.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        opt_plain.first_step(zero_grad=True)
        nn.functional.cross_entropy(plain(x), y).backward()
        opt_plain.second_step(zero_grad=True)
        amp_step(scaled, opt_scaled, scaler, x, y)
    assert scaler.unscale_calls == 3
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", ["first", "second"])
def test_nonfinite_pass_skips_the_step_and_touches_nothing(which):
    x, y = data()
    model, opt = setup()
    scaler = CountingScaler("cpu", init_scale=2.0**10)
    amp_step(model, opt, scaler, x, y)  # fill momentum buffers
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    scale = scaler.get_scale()
    amp_step(
        model, opt, scaler, x, y, poison_first=which == "first", poison_second=which == "second"
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    after = opt.state_dict()["state"]
    assert all(
        torch.equal(after[i]["momentum_buffer"], s["momentum_buffer"])
        for i, s in state["state"].items()
    )
    assert scaler.get_scale() == scale * 0.5
    assert not opt.is_perturbed


def test_nonfinite_first_pass_without_scaler_skips_when_asked():
    x, y = data()
    model, opt = setup(skip_nonfinite=True)
    weights = copy.deepcopy(model.state_dict())
    (nn.functional.cross_entropy(model(x), y) * float("nan")).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert opt.state_dict()["state"] == {}


def test_folding_the_first_pass_check_lets_an_outside_scaler_skip_the_step():
    """A caller whose GradScaler unscales and steps after the second backward (the
    transformers Trainer): a non-finite first pass must make the scaler skip."""
    x, y = data()
    model, opt = setup()
    scaler = CountingScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()  # finite
    opt.fold_first_pass_check()
    scaler.unscale_(opt)
    scaler.update()  # an overflow was recorded: the scale backs off
    assert scaler.get_scale() == 2.0**9
    opt.abandon_step()  # what the skip leaves to do
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("first_scaler", [None, "another"])
def test_a_scaler_that_first_step_did_not_get_is_refused_with_nothing_lost(first_scaler):
    # USAM's ε from a gradient scaled by 2**10 would be 2**10 times too large.
    x, y = data()
    model, opt = setup(normalize=False)
    w = [p.detach().clone() for p in model.parameters()]
    scaler = CountingScaler("cpu", init_scale=2.0**10)
    first = CountingScaler("cpu", init_scale=2.0**10) if first_scaler else None
    loss = nn.functional.cross_entropy(model(x), y)
    (loss if first is None else first.scale(loss)).backward()
    opt.first_step(zero_grad=True, grad_scaler=first)
    perturbed = [p.detach().clone() for p in model.parameters()]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match="second_step got a grad_scaler but first_step got"):
        opt.second_step(zero_grad=True, grad_scaler=scaler)
    assert scaler.unscale_calls == 0
    assert opt.is_perturbed and not opt.base_optimizer.state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
    opt.abandon_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
