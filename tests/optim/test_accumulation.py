"""step(closure) refuses gradients accumulated outside its closure, before anything moves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.optim.helpers import FAMILY, batches, bn_net, same, snapshot, state_equal


def _closure(model, x, y, zero_first=None):
    def closure():
        if zero_first is not None:
            zero_first()
        loss = nn.functional.cross_entropy(model(x), y) / 2
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", FAMILY)
def test_a_backward_before_the_closure_step_is_refused(name):
    """Lightning's accumulate_grad_batches: micro-batch 0's backward runs outside."""
    model = bn_net()
    opt = FAMILY[name](model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, model=model)
    (x0, y0), (x1, y1) = batches(2)
    opt.step(_closure(model, x0, y0))  # fill the momentum buffers
    (nn.functional.cross_entropy(model(x0), y0) / 2).backward()
    weights, state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"accumulation done outside its closure .* one closure"):
        opt.step(_closure(model, x1, y1))
    params_now = {k: v for k, v in snapshot(model).items() if "running" not in k and "num" not in k}
    assert same(params_now, {k: weights[k] for k in params_now})
    assert state_equal(opt.state_dict(), state)
    assert not opt.is_perturbed


def test_zero_gradients_at_entry_are_not_accumulation():
    """zero_grad(set_to_none=False) before the step leaves zeros: the same step as None."""
    data = batches(3)
    runs = []
    for set_to_none in (True, False):
        model = bn_net()
        opt = FAMILY["sam"](model.parameters(), torch.optim.SGD, lr=0.05, model=model)
        for x, y in data:
            opt.zero_grad(set_to_none=set_to_none)
            if not set_to_none:  # gradients of zeros, as after a zeroing at the end of a loop
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            opt.step(_closure(model, x, y))
        runs.append(snapshot(model))
    assert same(*runs)


def test_gradients_replaced_by_the_closure_are_not_accumulation():
    """Lightning's automatic optimization zeroes inside the closure (set_to_none)."""
    model = bn_net()
    opt = FAMILY["sam"](model.parameters(), torch.optim.SGD, lr=0.05, model=model)
    (x0, y0), (x1, y1) = batches(2)
    (nn.functional.cross_entropy(model(x0), y0)).backward()  # stale gradients at entry
    opt.step(_closure(model, x1, y1, zero_first=opt.zero_grad))
    reference = bn_net()
    ref_opt = FAMILY["sam"](reference.parameters(), torch.optim.SGD, lr=0.05, model=reference)
    reference(x0)  # the same BatchNorm history as the stale forward above
    ref_opt.step(_closure(reference, x1, y1))
    assert same(snapshot(model), snapshot(reference))
