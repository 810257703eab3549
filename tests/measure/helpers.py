"""Shared by the measure tests: small float64 models, their exact Hessians, and a
bit-exact model snapshot."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


class Quadratic(nn.Module):
    """Per-sample loss ``½ (w − xᵢ)ᵀ A (w − xᵢ)``; with ``xᵢ = 0`` it is ``½ wᵀAw``."""

    def __init__(self, a: Tensor, w: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: Tensor) -> Tensor:
        diff = self.w - x
        return 0.5 * ((diff @ self.a) * diff).sum(dim=1)


def mean_output(output: Tensor, target: Tensor) -> Tensor:
    return output.mean()


def spd_matrix(eigenvalues: list[float], seed: int = 0) -> Tensor:
    """``Q diag(λ) Qᵀ`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g).double())
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def make_mlp(batch_norm: bool, dropout: bool = False) -> nn.Module:
    """A float64 tanh MLP (4 → 8 → 3); with BatchNorm its running stats are non-trivial."""
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(8, 3))
    model = nn.Sequential(*layers).double()
    if batch_norm:
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 4, dtype=torch.float64) * 2 + 1)
    return model


def make_data(n: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def exact_hessian(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """The full Hessian of ``loss_fn(model(x), y)`` over the trainable parameters, in eval
    mode, of a function of one flat parameter vector: ``torch.func.hessian`` computed
    reverse-over-reverse (``jacrev(jacrev(f))``, rows in chunks), which avoids the
    forward-mode decompositions that ``hessian``'s ``jacfwd`` loads with a warning."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    was_training = {m: m.training for m in model.modules()}
    model.eval()

    def loss_of(vector: Tensor) -> Tensor:
        params, start = {}, 0
        for name, p in named:
            params[name] = vector[start : start + p.numel()].view_as(p)
            start += p.numel()
        return loss_fn(functional_call(model, {**params, **frozen, **buffers}, (x,)), y)

    try:
        return jacrev(jacrev(loss_of), chunk_size=32)(flat)
    finally:
        for m, t in was_training.items():
            m.training = t


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class Snapshot:
    """Everything a measurement must leave untouched, compared bit for bit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.modes = [m.training for m in model.modules()]
        self.flags = [p.requires_grad for p in model.parameters()]
        self.grads = [
            (p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()
        ]

    def assert_unchanged(self) -> None:
        now = self.model.state_dict(keep_vars=True)
        assert now.keys() == self.state.keys()
        for key, before in self.state.items():
            assert now[key].dtype == before.dtype, key
            assert torch.equal(_bits(now[key]), _bits(before)), f"{key} changed"
        assert [m.training for m in self.model.modules()] == self.modes
        assert [p.requires_grad for p in self.model.parameters()] == self.flags
        for p, (grad, value) in zip(self.model.parameters(), self.grads, strict=True):
            assert p.grad is grad
            if value is not None:
                assert torch.equal(_bits(p.grad), _bits(value))
