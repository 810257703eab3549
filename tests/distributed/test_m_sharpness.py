"""Single-process m-sharpness (flatmin.distributed.m_sharpness) against computations of
its own: per-sub-batch ε by autograd, the BatchNorm statistics in closed form, and plain
SAM for m = B. Its equality with two real processes is in test_ddp_sam.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatmin import ESAM, SAM
from flatmin.distributed import m_sharpness_step
from tests.distributed.ddp_workers import GLOBAL_BATCH, STEPS, make_data, make_model

RHO, LR = 0.05, 0.1


def linear_model():
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def reference_step(model, x, y, m):
    """``w ← w − lr·mean_k ∇L_k(w + ρ g_k/‖g_k‖)`` written out with autograd."""
    params = list(model.parameters())
    surrogate = [torch.zeros_like(p) for p in params]
    chunks = list(zip(x.split(m), y.split(m)))
    for xk, yk in chunks:
        grads = torch.autograd.grad(F.cross_entropy(model(xk), yk), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(RHO * g / norm)
        perturbed = torch.autograd.grad(F.cross_entropy(model(xk), yk), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(RHO * g / norm)
        for s, g in zip(surrogate, perturbed):
            s.add_(g / len(chunks))
    with torch.no_grad():
        for p, s in zip(params, surrogate):
            p.sub_(LR * s)


@pytest.mark.parametrize("m", [1, 2, 4, GLOBAL_BATCH])
def test_each_sub_batch_gets_its_own_epsilon(m):
    xs, ys = make_data()
    ours, reference = linear_model(), linear_model()
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    for step in range(STEPS):
        m_sharpness_step(opt, ours, F.cross_entropy, xs[step], ys[step], m=m)
        reference_step(reference, xs[step], ys[step], m)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_smaller_m_changes_the_step():
    xs, ys = make_data()
    results = []
    for m in (2, GLOBAL_BATCH):
        model = linear_model()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
        m_sharpness_step(opt, model, F.cross_entropy, xs[0], ys[0], m=m)
        results.append(model.weight.detach().clone())
    assert not torch.allclose(*results)


def test_batchnorm_statistics_move_once_with_the_mean_of_the_sub_batches():
    model = make_model()
    bn = model[1]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    xs, ys = make_data()
    x = xs[0]
    with torch.no_grad():
        hidden = model[0](x).reshape(2, GLOBAL_BATCH // 2, -1)
    mean, var = hidden.mean(dim=1).mean(dim=0), hidden.var(dim=1, unbiased=True).mean(dim=0)
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    m_sharpness_step(opt, model, F.cross_entropy, x, ys[0], m=GLOBAL_BATCH // 2)
    mu = bn.momentum
    torch.testing.assert_close(bn.running_mean, (1 - mu) * old_mean + mu * mean)
    torch.testing.assert_close(bn.running_var, (1 - mu) * old_var + mu * var)
    assert int(bn.num_batches_tracked) == 1


def test_m_equal_to_the_batch_is_plain_sam():
    xs, ys = make_data()
    sam, ours = make_model(), make_model()
    sam_opt = SAM(sam.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    our_opt = SAM(ours.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for step in range(STEPS):
        sam_opt.zero_grad()
        sam_opt.step(lambda s=step: F.cross_entropy(sam(xs[s]), ys[s]).backward(), model=sam)
        m_sharpness_step(our_opt, ours, F.cross_entropy, xs[step], ys[step], m=GLOBAL_BATCH)
    for key, value in sam.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("m", "error", "match"),
    [
        (3, ValueError, "a positive multiple of m=3"),
        (0, ValueError, "m must be an integer >= 1"),
        (True, TypeError, "m must be an integer >= 1"),
        (2.0, TypeError, "m must be an integer >= 1"),
    ],
)
def test_rejects_bad_m_and_changes_nothing(m, error, match):
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=LR)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = make_data()
    with pytest.raises(error, match=match):
        m_sharpness_step(opt, model, F.cross_entropy, xs[0], ys[0], m=m)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rejects_mismatched_targets_and_plain_optimizers():
    model = make_model()
    xs, ys = make_data()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="same batch size"):
        m_sharpness_step(opt, model, F.cross_entropy, xs[0], ys[0][:4], m=4)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="first_step"):
        m_sharpness_step(sgd, model, F.cross_entropy, xs[0], ys[0], m=4)


def test_refuses_esam_s_data_selection_it_cannot_run():
    model = make_model()
    xs, ys = make_data()
    opt = ESAM(model.parameters(), torch.optim.SGD, gamma=0.5, lr=LR)
    with pytest.raises(ValueError, match="gamma=1"):
        m_sharpness_step(opt, model, F.cross_entropy, xs[0], ys[0], m=4)
    assert all(p.grad is None for p in model.parameters())


def test_a_failing_sub_batch_restores_weights_and_statistics():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = make_data()
    calls = []

    def loss_fn(logits, y):
        calls.append(1)
        if len(calls) == 4:  # the second sub-batch's perturbed pass
            raise RuntimeError("boom")
        return F.cross_entropy(logits, y)

    with pytest.raises(RuntimeError, match="boom"):
        m_sharpness_step(opt, model, loss_fn, xs[0], ys[0], m=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.is_perturbed
