"""Guarantees every SAM-family optimizer gives (DESIGN.md, principles 1–3 and 6).

Parametrized over tests/optim/helpers.py's FAMILY: bit-exact resume for SGD with
momentum and for AdamW, exact restore when the second pass raises or leaves a parameter
without a gradient, BatchNorm statistics moved once per step, and steps under bf16
autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers import assert_resumes_bit_exactly
from tests.optim.helpers import (
    BASES,
    FAMILY,
    batches,
    bn_net,
    looksam_k2,
    resume_parts,
    same,
    snapshot,
    state_equal,
    steps_over,
    train,
)

# The contracts that cross step boundaries also run on LookSAM with k = 2, so that they
# cover its reuse steps (a checkpoint taken before a reuse step, for one).
ACROSS_STEPS = {**FAMILY, "looksam_k2": looksam_k2}


# (uses_clean_gradient, per_sample_closure): what each member's update needs, which
# flatmin.distributed.sam_step reads instead of knowing the classes.
TRAITS = {
    "sam": (False, False),
    "asam": (False, False),
    "asam_all": (False, False),
    "usam": (False, False),
    "stablesam": (True, False),
    "gsam": (True, False),
    "looksam": (True, False),
    "esam": (False, True),
}


@pytest.mark.parametrize("name", FAMILY)
def test_traits(name):
    opt = FAMILY[name](nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    assert (opt.uses_clean_gradient, opt.per_sample_closure) == TRAITS[name]
    if name != "stablesam":  # StableSAM's ‖g‖ makes any member use the clean gradient
        kw = dict(lr=0.1, stable=True)
        assert FAMILY[name](nn.Linear(2, 2).parameters(), torch.optim.SGD, **kw).uses_clean_gradient


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", ACROSS_STEPS)
def test_resume_is_bit_exact(name, base, tmp_path):
    assert_resumes_bit_exactly(
        resume_parts(ACROSS_STEPS[name], base),
        steps_over(batches(12)),
        epochs=12,  # optimizer steps here
        stop_after=7,
        checkpoint=tmp_path / "checkpoint.pt",
    )


@pytest.mark.parametrize("name", ACROSS_STEPS)
def test_weights_restored_when_second_pass_raises(name):
    model = bn_net()
    opt = ACROSS_STEPS[name](model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    data = batches(3)
    train(model, opt, data[:2])
    weights, state = snapshot(model), copy.deepcopy(opt.state_dict())
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass failed")
        loss = nn.functional.cross_entropy(model(data[2][0]), data[2][1])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="second pass failed"):
        opt.step(closure, model=model)
    assert len(calls) == 2, "the method must run a second pass on this step"
    # BN running stats moved in the first pass, as in any step; the weights did not.
    params_now = {
        k: v for k, v in snapshot(model).items() if "running" not in k and "num_batches" not in k
    }
    params_before = {
        k: v for k, v in weights.items() if "running" not in k and "num_batches" not in k
    }
    assert same(params_now, params_before)
    assert state_equal(opt.state_dict(), state)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    train(model, opt, data[:1])  # usable afterwards


@pytest.mark.parametrize("name", FAMILY)
def test_parameter_without_second_pass_gradient_is_restored(name):
    torch.manual_seed(0)
    used, unused = nn.Linear(4, 3), nn.Linear(4, 3)
    params = [*used.parameters(), *unused.parameters()]
    opt = FAMILY[name](params, torch.optim.SGD, lr=0.0)
    before = [p.detach().clone() for p in params]
    x = torch.randn(5, 4)
    calls = []

    def closure():
        calls.append(1)
        out = used(x) + (unused(x) if len(calls) == 1 else 0)
        loss = out.square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == 2
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("name", FAMILY)
def test_batchnorm_statistics_move_once_per_step(name):
    model = bn_net()
    opt = FAMILY[name](model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    reference = copy.deepcopy(model)
    reference(x)  # one training-mode forward at w: what the statistics must become
    train(model, opt, [(x, y)])
    bn, ref_bn = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.track_running_stats and bn.momentum == 0.1


@pytest.mark.parametrize("name", FAMILY)
def test_steps_under_bf16_autocast(name):
    data = batches(4)
    models = {}
    for amp in (False, True):
        model = bn_net()
        opt = FAMILY[name](model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            train(model, opt, data)
        models[amp] = model
    for p, q in zip(models[False].parameters(), models[True].parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q, p, rtol=0.05, atol=0.02)
    assert not same(snapshot(models[True]), snapshot(bn_net()))
