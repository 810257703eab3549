"""The tempered KL divergence that SAF and MESA add to the training loss.

Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022 (arXiv 2205.14083),
Eq. 8 and the authors' code: with a temperature ``τ`` and a constant target ``t``,

    D(z, t) = τ² · mean_i KL( softmax(t_i/τ) ‖ softmax(z_i/τ) )
            = τ² · mean_i Σ_c p_ic · (log p_ic − log q_ic),
    p_i = softmax(t_i/τ),  q_i = softmax(z_i/τ).

The τ² factor is in the official code (not in the paper's Eq. 8); it keeps the gradient's
scale independent of τ to first order: ``∂D/∂z_i = τ·(q_i − p_i)/B``.

:func:`bucketed_tempered_kl` is the same term against a compressed target that keeps only
the ``k`` largest past logits and the mass of the other classes (SAF's ``top_k`` store).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from flatmin.trajectory import _topk_compiled


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
    _check_valid(valid, logits)
    dtype = _compute_dtype(logits)
    divisor = _constant(tau, dtype, logits.device)
    log_q = _log_softmax(_as(logits, dtype, logits.device).div(divisor))
    with torch.no_grad():
        target = _as(target_logits.detach(), dtype, logits.device)
        log_p = _log_softmax(target.div(divisor))
    return _mean_kl(log_p, log_q, valid, _constant(weight * tau * tau, dtype, logits.device))


def bucketed_tempered_kl(
    logits: Tensor,
    top_logits: Tensor,
    top_classes: Tensor,
    rest_lse: Tensor,
    tau: float,
    valid: Tensor | None = None,
    *,
    weight: float = 1.0,
) -> Tensor:
    r"""The tempered KL against a target of which only the top ``k`` classes are kept.

    Each target row keeps the ``k`` largest past logits ``z̃_i`` (``i ∈ T``, the classes
    ``top_classes``) and ``rest_lse = log Σ_{j∉T} exp(z̃_j/τ)``, so the past distribution
    ``p = softmax(z̃/τ)`` is known on ``T`` and as one mass ``r = 1 − Σ_{i∈T} p_i`` on the
    other classes. The term treats those classes as one bucket:

    .. math::
        \mathrm{KL}_k(p ‖ q) = \sum_{i∈T} p_i \log\frac{p_i}{q_i}
            + r \log\frac{r}{\sum_{j∉T} q_j},   \quad q = \mathrm{softmax}(z/τ),

    times ``weight·τ²`` and averaged over the (valid) rows like :func:`tempered_kl`. It is
    the KL divergence of ``p`` and ``q`` with the classes outside ``T`` merged, so by the
    log-sum inequality (``Σ_{j∉T} p_j log(p_j/q_j) ≥ r·log(r/Q)``, ``Q = Σ_{j∉T} q_j``) it
    never exceeds the full KL, and it equals it when ``k = C``. Its gradient: with
    ``∂ log q_i/∂z = (e_i − q)/τ`` and ``∂ log Q/∂z = (1_{∉T}·q/Q − q)/τ``,

    .. math::
        \frac{∂}{∂z}\,\mathrm{weight}·τ²·\mathrm{KL}_k = \mathrm{weight}·τ·(q − \tilde p),
        \quad \tilde p_i = p_i \ (i ∈ T), \quad \tilde p_j = r·q_j/Q \ (j ∉ T),

    divided by the number of rows averaged: the bucket's mass is spread over its classes
    in proportion to the current ``q``.

    Numerics: the merged classes enter as log-sum-exps (``log Q`` of the current tempered
    logits outside ``T``, taken against their own maximum, and ``rest_lse`` of the past
    ones), so ``r`` and ``Q`` are never computed as ``1 − Σ`` (which loses every digit when
    the top ``k`` hold nearly all the mass) and never underflow to a ``log 0``: ``r → 0``
    gives a bucket term of exactly 0, a tiny ``Q`` a large but finite one, and with
    ``k = C`` there is no bucket. The value and the gradient are finite wherever the full
    term's are; invalid rows get no gradient whatever their targets hold.

    Args:
        logits: current logits ``z``, shape ``(B, C)``; the gradient flows through them.
        top_logits: the ``k`` past logits kept per row, shape ``(B, k)`` (any float dtype).
        top_classes: their classes, integer tensor ``(B, k)`` with values in ``[0, C)``,
            distinct within a row.
        rest_lse: ``log Σ_{j∉T} exp(z̃_j/τ)`` per row, shape ``(B,)`` (``−inf`` if ``k = C``).
        tau: temperature ``τ > 0``, the one ``rest_lse`` was computed with.
        valid: optional boolean mask ``(B,)``, as in :func:`tempered_kl`.
        weight: a factor folded into ``τ²`` (SAF's ``λ``).

    Example::

        import torch
        from flatmin.trajectory.kl import bucketed_tempered_kl

        z_past, z = torch.randn(4, 100), torch.randn(4, 100, requires_grad=True)
        top, classes = z_past.topk(5, dim=1)
        rest = (z_past / 5).scatter(1, classes, float("-inf")).logsumexp(1)
        bucketed_tempered_kl(z, top, classes, rest, tau=5.0).backward()
    """
    batch, num_classes = logits.shape if logits.dim() == 2 else (-1, -1)
    k = top_classes.shape[-1] if top_classes.dim() == 2 else -1
    if (
        batch < 0
        or top_logits.shape != (batch, k)
        or top_classes.shape != (batch, k)
        or rest_lse.shape != (batch,)
        or not 1 <= k <= num_classes
    ):
        raise ValueError(
            "expected logits (B, C), top_logits and top_classes (B, k) with 1 <= k <= C and "
            f"rest_lse (B,), got {tuple(logits.shape)}, {tuple(top_logits.shape)}, "
            f"{tuple(top_classes.shape)} and {tuple(rest_lse.shape)}"
        )
    if top_classes.is_floating_point() or top_classes.is_complex():
        raise TypeError(f"expected integer top_classes, got dtype {top_classes.dtype}")
    if batch and not 0 <= int(top_classes.min()) <= int(top_classes.max()) < num_classes:
        raise ValueError(
            f"expected top_classes in [0, {num_classes}), got values in "
            f"[{int(top_classes.min())}, {int(top_classes.max())}]"
        )
    if not tau > 0:
        raise ValueError(f"expected a temperature tau > 0, got {tau}")
    _check_valid(valid, logits)
    if batch == 0:
        return zero_term(logits)
    index = _as(top_classes, torch.long, logits.device)
    return bucketed_term(logits, top_logits, index, rest_lse[:, None], tau, valid, weight=weight)


def bucketed_term(
    logits: Tensor,
    top_logits: Tensor,
    index: Tensor,
    rest_column: Tensor,
    tau: float,
    valid: Tensor | None = None,
    *,
    weight: float = 1.0,
) -> Tensor:
    """:func:`bucketed_tempered_kl` without its argument checks, for rows a store wrote:
    ``index`` is any integer tensor of classes (``int64`` spares a conversion),
    ``rest_column`` is ``rest_lse`` as a ``(B, 1)`` column, the batch is not empty."""
    device = logits.device
    if valid is not None and (valid.dtype != torch.bool or valid.device != device):
        valid = valid.to(device=device, dtype=torch.bool)
    return _BucketedKL.apply(
        logits, top_logits.detach(), index, rest_column.detach(), valid, tau, weight
    )


class _BucketedKL(torch.autograd.Function):
    """:func:`bucketed_tempered_kl`: the value from the grouped logits, the gradient
    ``weight·τ·(q − p̃)/B`` in closed form, computed in the forward (the backward only
    scales it).

    The classes outside ``T`` are exponentiated once, against their own maximum ``m``:
    ``e_j = exp(s_j − m)`` (``s = z/τ``), so ``Σ_{j∉T} e_j ≥ 1`` and nothing underflows
    however small ``Q`` is. The past's and the present's grouped logits, ``(z̃_T/τ,
    rest_lse)`` and ``(s_T, m + log Σ e)``, are normalized together as one ``(B, 2, k+1)``
    tensor, and on ``j ∉ T`` the gradient is ``q_j − r·q_j/Q = e_j·(Q − r)/Σ e``.
    ``rest_lse`` comes as ``(B, 1)``. float32 logits on the CPU take the same arithmetic
    as compiled loops (:mod:`flatmin.trajectory._topk_compiled`) when numba is installed.
    """

    @staticmethod
    def forward(ctx, logits, top_logits, index, rest_lse, valid, tau, weight):
        computed = None
        if _topk_compiled.applies(logits) and top_logits.device.type == "cpu":
            computed = _topk_compiled.bucketed_forward(
                logits, top_logits, index, rest_lse, valid, tau, weight
            )
        if computed is None:
            dtype, device = _compute_dtype(logits), logits.device
            computed = _bucketed_forward(
                logits,
                top_logits,
                _as(index, torch.long, device),
                _as(rest_lse, dtype, device),
                valid,
                _constant(tau, dtype, device),
                _constant(weight * tau * tau, dtype, device),
                _constant(weight * tau, dtype, device),
            )
        value, grad = computed
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None, None


def _bucketed_forward(logits, top_logits, index, rest_lse, valid, tau, scale, weight_tau):
    """:class:`_BucketedKL`'s value and gradient as torch ops (``index`` int64, the
    constants 0-dim tensors of the compute dtype)."""
    (batch, num_classes), k = logits.shape, index.shape[1]
    scaled = _as(logits, tau.dtype, logits.device).div(tau)
    present = scaled.gather(1, index)
    bucket = k < num_classes
    if bucket:
        scaled.scatter_(1, index, float("-inf"))  # e_j = 0 on T
        shift = scaled.amax(dim=1, keepdim=True)
        exp = scaled.sub_(shift).exp_()
        total = exp.sum(dim=1, keepdim=True)
        # (B, 2, k+1): the past's groups (z̃_T/τ, rest_lse), then the present's.
        parts = (top_logits.div(tau[None]), rest_lse, present, total.log().add_(shift))
    else:
        parts = (top_logits.div(tau[None]), present)
    groups = torch.cat(parts, dim=1).view(batch, 2, -1)
    groups = groups.sub_(groups.amax(dim=2, keepdim=True))
    probs = groups.exp()
    norm = probs.sum(dim=2, keepdim=True)
    log_p, log_q = groups.sub_(norm.log()).unbind(1)
    p, q = probs.div_(norm).unbind(1)
    rows = log_p.sub_(log_q).mul_(p).sum(dim=1)
    # Per group q − p: on T the gradient q_i − p_i; the bucket's Q − r, which spread
    # as e_j·(Q − r)/Σe gives q_j − r·q_j/Q on j ∉ T.
    diff = q.sub_(p)
    if bucket:
        diff[:, k:].div_(total)
    if valid is None:
        count = rows.new_tensor(float(batch))
        value = rows.sum()
    else:
        count = valid.sum(dtype=tau.dtype).clamp_(min=1)
        zero = _constant(0.0, tau.dtype, logits.device)
        value = torch.where(valid, rows, zero).sum()
    diff = diff.mul_(weight_tau / count)
    if bucket:
        grad = exp.mul_(diff[:, k:])
        grad.scatter_add_(1, index, diff[:, :k])
    else:  # every class is in T: the whole gradient is q − p, scattered
        grad = torch.zeros_like(scaled).scatter_(1, index, diff)
    if valid is not None:  # invalid rows: no gradient, whatever their logits and targets hold
        grad = torch.where(valid[:, None], grad, zero)
    return value.mul_(scale).div_(count), grad


def _mean_kl(log_p: Tensor, log_q: Tensor, valid: Tensor | None, scale: Tensor) -> Tensor:
    """``scale · mean_i Σ_c p_ic (log p_ic − log q_ic)`` over all rows or the valid ones."""
    pointwise = log_p.exp() * (log_p - log_q)
    if valid is None:
        return scale * pointwise.sum(dim=1).mean()
    if valid.dtype != torch.bool or valid.device != log_q.device:
        valid = valid.to(device=log_q.device, dtype=torch.bool)
    count = valid.sum(dtype=log_q.dtype).clamp_(min=1)
    kept = torch.where(valid[:, None], pointwise, pointwise.new_zeros(()))
    return kept.sum().mul(scale).div(count)


def _check_valid(valid: Tensor | None, logits: Tensor) -> None:
    if valid is not None and valid.shape != logits.shape[:1]:
        raise ValueError(
            f"expected a boolean valid mask of shape ({logits.shape[0]},), got {tuple(valid.shape)}"
        )


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
