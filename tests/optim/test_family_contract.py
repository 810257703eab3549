"""Guarantees every SAM-family optimizer gives (DESIGN.md, principles 1–3 and 6).

Parametrized over tests/optim/family.py: bit-exact resume for SGD with momentum and for
AdamW, exact restore when the second pass raises or leaves a parameter without a
gradient, BatchNorm statistics moved once per step, and steps under bf16 autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.optim.family import FAMILY

BASES = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
}


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def batches(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(n)
    ]


def train(model, opt, data):
    losses = []
    for x, y in data:
        opt.zero_grad()

        def closure(x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure, model=model).detach())
    return losses


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _flatten_state(sd):
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x.clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            out.append(x)

    walk(sd)
    return out


def state_equal(a, b):
    fa, fb = _flatten_state(a), _flatten_state(b)
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", FAMILY)
def test_resume_is_bit_exact(name, base, tmp_path):
    base_cls, kw = BASES[base]
    data = batches(12)

    straight = bn_net()
    opt = FAMILY[name](straight.parameters(), base_cls, **kw)
    train(straight, opt, data)

    first = bn_net()
    opt1 = FAMILY[name](first.parameters(), base_cls, **kw)
    train(first, opt1, data[:7])
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "ckpt.pt")
    del first, opt1

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = bn_net(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = FAMILY[name](resumed.parameters(), base_cls, **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[7:])
    assert same(snapshot(straight), snapshot(resumed))


@pytest.mark.parametrize("name", FAMILY)
def test_weights_restored_when_second_pass_raises(name):
    model = bn_net()
    opt = FAMILY[name](model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
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
