"""SAF and MESA are loss terms, so they compose with a two-pass optimizer such as SAM."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from flatmin import MESA, SAF, SAM
from tests.trajectory.helpers import numpy_tempered_kl


def _data(n=24):
    return torch.randn(n, 5), torch.randint(0, 3, (n,))


def test_saf_with_sam_records_the_first_pass_once_per_step():
    x, y = _data()
    x = x.double()  # float64 throughout, so the term is pinned to round-off
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()  # no BN
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    saf = SAF(len(x), 3, lam=1.0, lag_epochs=1, start_epoch=0)
    initial = [p.detach().clone() for p in model.parameters()]
    for epoch in range(3):
        saf.set_epoch(epoch)
        for idx in torch.randperm(len(x)).split(6):
            passes = []

            def closure(idx=idx, passes=passes):
                logits = model(x[idx])
                term = saf(logits, idx)
                passes.append((logits.detach(), term.detach()))
                loss = F.cross_entropy(logits, y[idx]) + term
                loss.backward()
                return loss

            with torch.no_grad():
                logits_at_w = model(x[idx])
            target = saf.store.logits[0, idx].double().numpy()  # last epoch's, before the step
            written_before = saf.store.written_epoch.clone()
            loss = opt.step(closure)
            assert math.isfinite(loss.item())
            assert len(passes) == 2
            # Exactly one write per sample and step, holding the first pass's logits.
            changed = (saf.store.written_epoch != written_before).nonzero()
            assert sorted(changed[:, 1].tolist()) == sorted(idx.tolist())
            assert torch.equal(saf.store.logits[0, idx], logits_at_w.half())
            # Both passes compare with the same target of the previous epoch.
            assert not torch.equal(passes[0][0], passes[1][0])  # w and w + ε
            for logits, term in passes:
                expected = numpy_tempered_kl(logits.double().numpy(), target, 5.0)
                assert math.isclose(term.item(), expected if epoch >= 1 else 0.0, rel_tol=1e-9)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial, strict=True))


def test_mesa_with_sam():
    x, y = _data()
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    mesa = MESA(model, decay=0.9, start_epoch=0, warmup=True)
    initial = [p.detach().clone() for p in model.parameters()]
    teacher_initial = [p.clone() for p in mesa.teacher.parameters()]
    for epoch in range(3):
        mesa.set_epoch(epoch)
        for idx in torch.randperm(len(x)).split(6):

            def closure(idx=idx):
                logits = model(x[idx])
                loss = F.cross_entropy(logits, y[idx]) + mesa(x[idx], logits)
                loss.backward()
                return loss

            loss = opt.step(closure, model=model)
            mesa.update()
            assert math.isfinite(loss.item())
    assert mesa.ema.num_updates == 12
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial, strict=True))
    assert all(
        not torch.equal(p, q)
        for p, q in zip(mesa.teacher.parameters(), teacher_initial, strict=True)
    )
    assert all(p.grad is None for p in mesa.teacher.parameters())
