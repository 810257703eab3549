"""Shared helpers of the tests/optim package: the family every contract test runs
against, small models and data, a closed-form quadratic, state comparisons and the parts
that tests.helpers.assert_resumes_bit_exactly resumes.

Each FAMILY entry builds an optimizer from (params, base optimizer class, base kwargs)
with settings under which the method really perturbs (ρ > 0). New members of the family
add one entry here and inherit the contract tests of tests/optim/test_family_contract.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flatmin import ASAM, ESAM, GSAM, SAM, LookSAM, StableSAM

FAMILY = {
    "sam": lambda params, base, **kw: SAM(params, base, rho=0.05, **kw),
    "asam": lambda params, base, **kw: ASAM(params, base, rho=0.5, **kw),
    "asam_all": lambda params, base, **kw: SAM(params, base, rho=2.0, adaptive="all", **kw),
    "usam": lambda params, base, **kw: SAM(params, base, rho=0.05, normalize=False, **kw),
    "stablesam": lambda params, base, **kw: StableSAM(params, base, rho=0.05, **kw),
    # GSAM with its LR-driven radius and the orthogonal correction both active.
    "gsam": lambda params, base, **kw: GSAM(params, base, rho=0.05, alpha=0.4, rho_min=0.01, **kw),
    # Full steps only (k = 1): under bf16 autocast the reused direction g_v, a small
    # difference of two gradients, is rounding noise, so reuse steps cannot meet the
    # autocast tolerance. LOOKSAM_K2 runs the other contracts across reuse steps.
    "looksam": lambda params, base, **kw: LookSAM(params, base, rho=0.05, k=1, alpha=0.7, **kw),
    # SAM-style closures: stochastic weight perturbation only (data selection needs
    # per-sample losses; tests/optim/test_esam.py covers it).
    "esam": lambda params, base, **kw: ESAM(
        params, base, rho=0.05, beta=0.6, gamma=1.0, seed=0, **kw
    ),
}


def looksam_k2(params, base, **kw):
    """LookSAM alternating full and reuse steps (full, reuse, full, …)."""
    return LookSAM(params, base, rho=0.05, k=2, alpha=0.7, **kw)


BASES = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
}


# -- a small BatchNorm network and its data ----------------------------------------------


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
    """One ``opt.step`` with a SAM-style closure per batch; the first-pass losses."""
    losses = []
    for x, y in data:
        opt.zero_grad()

        def closure(x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure, model=model).detach())
    return losses


def train_per_sample(model, opt, data):
    """One ``opt.step`` per batch with ESAM's per-sample closure."""
    for x, y in data:
        opt.zero_grad()

        def closure(indices=None, x=x, y=y):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return nn.functional.cross_entropy(model(xb), yb, reduction="none")

        opt.step(closure, model=model)


# -- comparisons ----------------------------------------------------------------------------


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
                out.append(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            out.append(x)

    walk(sd)
    return out


def state_equal(a, b):
    """Same keys, same values and bit-identical tensors, at every depth."""
    fa, fb = _flatten_state(a), _flatten_state(b)
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def resume_parts(
    make_optimizer: Callable, base: str, *, resumed_optimizer: Callable | None = None
) -> Callable:
    """``make(seed)`` for :func:`tests.helpers.assert_resumes_bit_exactly`: the BatchNorm
    network initialized from ``seed`` and ``make_optimizer`` over it with the base
    optimizer ``base`` (``resumed_optimizer`` builds the resumed run's, seed ≠ 0)."""
    base_cls, kw = BASES[base]

    def make(seed: int) -> dict:
        model = bn_net(seed)
        build = resumed_optimizer if seed and resumed_optimizer else make_optimizer
        return {"model": model, "optimizer": build(model.parameters(), base_cls, **kw)}

    return make


def steps_over(data: list, run: Callable = train) -> Callable:
    """``train(parts, steps)`` for :func:`tests.helpers.assert_resumes_bit_exactly`: one
    optimizer step per batch ``data[i]``, ``i`` in ``steps``."""
    return lambda parts, steps: run(parts["model"], parts["optimizer"], [data[i] for i in steps])


# -- L(w) = ½ wᵀAw with a 'weight' and a 'bias' parameter -----------------------------------

DT = torch.float64
LR = 0.1


class Quadratic(nn.Module):
    """L([w; b]) = ½ [w; b]ᵀ A [w; b] with a 'weight' and a 'bias' parameter."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, A: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(w.clone())
        self.bias = nn.Parameter(b.clone())
        self.register_buffer("A", A)

    def forward(self) -> torch.Tensor:
        v = torch.cat([self.weight.reshape(-1), self.bias])
        return 0.5 * v @ self.A @ v


def make_problem(n_w=6, n_b=3, weight_shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_w + n_b
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = M @ M.T / n + torch.eye(n, dtype=DT)
    w = torch.randn(n_w, generator=g, dtype=DT)
    b = torch.randn(n_b, generator=g, dtype=DT)
    if weight_shape is not None:
        w = w.reshape(weight_shape)
    return w, b, A


def grad_at(A, v):
    return A @ v


def one_step(opt, model):
    opt.zero_grad()
    return opt.step(lambda: (loss := model()).backward() or loss)


def flat(model):
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def expected_step(A, v, eps, gamma=1.0):
    """v − lr·γ·∇L(v + ε) for plain SGD."""
    return v - LR * gamma * grad_at(A, v + eps)
