"""Models, data and independent reference computations shared by the trajectory tests."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def numpy_tempered_kl(z: np.ndarray, t: np.ndarray, tau: float) -> float:
    """``τ²·mean_i KL(softmax(t_i/τ) ‖ softmax(z_i/τ))`` in numpy, as the paper writes it."""

    def log_softmax(a: np.ndarray) -> np.ndarray:
        a = a / tau
        a = a - a.max(axis=1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(t), log_softmax(z)
    return float(tau**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def bn_mlp(inputs: int = 4, hidden: int = 6, classes: int = 3, dtype=torch.float32) -> nn.Module:
    """Linear → BatchNorm1d → ReLU → Linear."""
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes)
    ).to(dtype)


class Residual(nn.Module):
    """A residual block whose first conv's output also skips its BN (that BN stays)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = nn.Conv2d(4, 4, 1, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(4, affine=False)

    def forward(self, x):
        h = self.conv(x)
        return torch.relu(self.bn(h) + h + self.shortcut_bn(self.shortcut(x)))


def bn_cnn() -> nn.Module:
    """For inputs (N, 3, 8, 8): three foldable pairs (conv→BN, the residual's 1×1
    shortcut→affine-free BN, linear→BN1d) and one BN that must stay (its input is reused)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Residual(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def plain_eval_forward(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An independent forward of ``network``'s weights: a fresh copy, NCHW, nothing folded."""
    plain = copy.deepcopy(network).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        return plain(x.contiguous())


def move_student(model: nn.Module, x: torch.Tensor, scale: float = 0.3) -> None:
    """Perturb every weight and run a train-mode forward on ``x`` (moves BN statistics)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.train()(x)


def numpy_bucketed_kl(z: np.ndarray, past: np.ndarray, k: int, tau: float) -> np.ndarray:
    """Per row, ``τ²·KL_k(p ‖ q)`` written out from the full past logits: the top ``k``
    classes of ``past`` kept, the others merged into one bucket (float64, log space)."""

    def log_softmax(a: np.ndarray) -> np.ndarray:
        a = a / tau
        return a - np.logaddexp.reduce(a, axis=1, keepdims=True)

    log_p, log_q = log_softmax(past), log_softmax(z)
    out = np.empty(len(z))
    for i in range(len(z)):
        top = np.argsort(-past[i], kind="stable")[:k]
        rest = np.setdiff1d(np.arange(z.shape[1]), top)
        value = np.sum(np.exp(log_p[i, top]) * (log_p[i, top] - log_q[i, top]))
        if len(rest):
            log_r = np.logaddexp.reduce(log_p[i, rest])
            log_big_q = np.logaddexp.reduce(log_q[i, rest])
            value += np.exp(log_r) * (log_r - log_big_q)
        out[i] = tau**2 * value
    return out


def bucketed_gradient(z: np.ndarray, past: np.ndarray, k: int, tau: float) -> np.ndarray:
    """``τ·(q − p̃)`` per row (the gradient of :func:`numpy_bucketed_kl` for one row):
    ``p̃ = p`` on the top ``k`` classes, ``r·q_j/Q`` on the others."""
    q = np.exp(z / tau - np.logaddexp.reduce(z / tau, axis=1, keepdims=True))
    p = np.exp(past / tau - np.logaddexp.reduce(past / tau, axis=1, keepdims=True))
    p_tilde = np.empty_like(p)
    for i in range(len(z)):
        top = np.argsort(-past[i], kind="stable")[:k]
        rest = np.setdiff1d(np.arange(z.shape[1]), top)
        p_tilde[i, top] = p[i, top]
        if len(rest):
            p_tilde[i, rest] = p[i, rest].sum() * q[i, rest] / q[i, rest].sum()
    return tau * (q - p_tilde)
