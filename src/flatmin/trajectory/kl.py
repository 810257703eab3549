"""The tempered KL divergence that SAF and MESA add to the training loss.

Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022 (arXiv 2205.14083),
Eq. 8 and the authors' code: with a temperature ``τ`` and a constant target ``t``,

    D(z, t) = τ² · mean_i KL( softmax(t_i/τ) ‖ softmax(z_i/τ) )
            = τ² · mean_i Σ_c p_ic · (log p_ic − log q_ic),
    p_i = softmax(t_i/τ),  q_i = softmax(z_i/τ).

The τ² factor is in the official code (not in the paper's Eq. 8); it keeps the gradient's
scale independent of τ to first order: ``∂D/∂z_i = τ·(q_i − p_i)/B``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def zero_term(logits: Tensor) -> Tensor:
    """A zero loss term that is part of ``logits``' graph (its gradient is all zeros).

    Built from an empty slice, so it is exactly 0 even when ``logits`` holds inf/NaN, and
    ``loss + zero_term(logits)`` keeps working with ``backward()`` and with SAM's closure.
    The dtype is the one :func:`tempered_kl` returns (at least float32).
    """
    return logits.narrow(0, 0, 0).sum(dtype=_compute_dtype(logits))


def tempered_kl(
    logits: Tensor,
    target_logits: Tensor,
    tau: float,
    valid: Tensor | None = None,
    *,
    weight: float = 1.0,
) -> Tensor:
    """``weight · τ² · mean_i KL(softmax(target_i/τ) ‖ softmax(logits_i/τ))``, target detached.

    Args:
        logits: current logits ``z``, shape ``(B, C)``; the gradient flows through them.
        target_logits: the past/teacher logits ``t``, shape ``(B, C)``; treated as constant.
        tau: temperature ``τ > 0``.
        valid: optional boolean mask of shape ``(B,)``. The mean is then taken over the
            valid rows only (``Σ_valid KL_i / #valid``) and the result is an exact zero,
            still attached to the graph, when no row is valid. Invalid rows contribute
            neither value nor gradient. Counting the rows stays on the device (no sync).
        weight: a factor folded into the same multiplication as ``τ²`` (SAF's ``λ``).

    Returns:
        A scalar in ``logits``' dtype promoted to at least float32 (half-precision logits
        are upcast before the softmax, so the term is accurate under autocast).
    """
    if logits.dim() != 2 or target_logits.shape != logits.shape:
        raise ValueError(
            "expected logits and target_logits of the same shape (B, C), got "
            f"{tuple(logits.shape)} and {tuple(target_logits.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"expected a temperature tau > 0, got {tau}")
    if logits.shape[0] == 0:
        return zero_term(logits)
    dtype = _compute_dtype(logits)
    scale = _constant(weight * tau * tau, dtype, logits.device)
    divisor = _constant(tau, dtype, logits.device)
    log_q = _log_softmax(_as(logits, dtype, logits.device).div(divisor))
    with torch.no_grad():
        target = _as(target_logits.detach(), dtype, logits.device)
        log_p = _log_softmax(target.div(divisor))
        p = log_p.exp()
    pointwise = p * (log_p - log_q)
    if valid is None:
        return scale * pointwise.sum(dim=1).mean()
    if valid.shape != logits.shape[:1]:
        raise ValueError(
            f"expected a boolean valid mask of shape ({logits.shape[0]},), got {tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool or valid.device != logits.device:
        valid = valid.to(device=logits.device, dtype=torch.bool)
    count = valid.sum(dtype=dtype).clamp_(min=1)
    kept = torch.where(valid[:, None], pointwise, pointwise.new_zeros(()))
    return kept.sum().mul(scale).div(count)


def _log_softmax(scaled: Tensor) -> Tensor:
    """Row-wise log-softmax as ``a − (log Σ exp(a − m) + m)`` with ``m = max(a)`` per row.

    The values of ``F.log_softmax``, computed with element-wise kernels only:
    ``F.log_softmax`` (forward and backward) opens an OpenMP parallel region even for a
    (128, 10) input, and on a CPU shared with other work each such region can wait for a
    scheduler slice. The arithmetic is ``torch.logsumexp``'s (the same values for finite
    rows) without its infinity masking (a row holding ±inf gives NaN either way); the
    shift ``m`` cancels in the gradient, so it is taken without one.
    """
    row_max = scaled.detach().amax(dim=1, keepdim=True)
    return scaled - ((scaled - row_max).exp().sum(dim=1, keepdim=True).log() + row_max)


@functools.lru_cache(maxsize=32)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor holding ``value`` (never modified; cached, as τ and λ rarely change).

    Multiplying by it spares the conversion of a Python float (a float64 scalar) in
    every element-wise call, forward and backward.
    """
    with torch.inference_mode(False):  # a normal tensor, so autograd may save it
        return torch.tensor(value, dtype=dtype, device=device)


def _as(values: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` in ``dtype`` on ``device``, without a dispatch when it already is."""
    if values.dtype == dtype and values.device == device:
        return values
    return values.to(device=device, dtype=dtype)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)
