"""SAM's sharpness measure ``L(w+ε) − L(w)`` and m-sharpness (Foret et al., ICLR 2021).

The sharpness of SAM (arXiv 2010.01412, eq. 1) is ``max_{‖ε‖₂≤ρ} L(w+ε) − L(w)``; SAM
approximates the maximiser with one normalized gradient step ``ε = ρ·g/‖g‖₂``,
``g = ∇L(w)``. This is the per-epoch curve of the SAF paper's Figure 3.

- ``steps > 1`` refines ε by projected normalized-gradient ascent on the ball,
  ``δ ← Π_{‖δ‖≤ρ}(δ + ρ·u/‖u‖)``, ``u = T⊙∇L(w+ε)``, ``ε = T⊙δ``; the first step is
  SAM's ε, and the reported value is the largest ``L(w+ε_t) − L(w)`` over the steps
  (every iterate is feasible, so this is the best lower bound on the maximum found).
- ``adaptive="weights"`` uses ASAM's scaled ball ``‖T_w⁻¹ε‖₂ ≤ ρ`` (Kwon et al., ICML
  2021, the official definition): ``T_w = |w| + η`` on every parameter whose name
  contains ``weight`` and ``T_w = 1`` on the others, so the one-step ε is
  ``ρ·T_w²⊙g / ‖T_w⊙g‖₂`` — the ε of ``SAM(adaptive="weights")``. ``adaptive="all"``
  scales every parameter (the popular port's form). η defaults to the form's own, 0.01
  and 0 respectively.
- ``m`` (m-sharpness, SAM §4.1): every batch is cut into disjoint sub-batches of ``m``
  samples, each gets its own ε from its own gradient, and the sharpness is the
  sample-weighted mean over the sub-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatmin.measure._state import measuring, trainable_parameters
from flatmin.measure.batches import (
    Batch,
    LossFn,
    collect_batches,
    loss_and_gradient,
    mean_loss,
    model_device,
    num_samples,
    split_batches,
)
from flatmin.optim._buckets import is_adaptive_weight
from flatmin.optim._checks import check_int, check_real
from flatmin.optim._settings import DEFAULT_ETA, check_adaptive, check_rho

Progress = Callable[[Iterable], Iterable]


@dataclass(frozen=True)
class SharpnessResult:
    """``value = L(w+ε) − L(w)``, averaged over the ε-groups by sample count.

    ``loss`` is ``L(w)`` and ``perturbed_loss`` the mean ``L(w+ε)``; ``num_groups`` is
    the number of independent perturbations (1 unless ``m`` is set). No randomness is
    involved, so ``seed`` is None.
    """

    value: float
    loss: float
    perturbed_loss: float
    rho: float
    adaptive: str | None
    m: int | None
    steps: int
    num_groups: int
    num_samples: int
    seed: int | None = None


def _ball_scale(
    named: Sequence[tuple[str, Tensor]], adaptive: str | None, eta: float | None
) -> list[Tensor] | None:
    """ASAM's ``T_w`` for every parameter; None for plain SAM."""
    if adaptive is None:
        return None
    eta = DEFAULT_ETA[adaptive] if eta is None else eta
    return [
        p.detach().abs() + eta
        if adaptive == "all" or is_adaptive_weight(p, name)
        else torch.ones_like(p)
        for name, p in named
    ]


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


@torch.no_grad()
def _set_weights(
    params: Sequence[Tensor], origin: Sequence[Tensor], eps: Sequence[Tensor] | None = None
) -> None:
    """``w ← origin + ε``, or exactly ``origin`` when ``eps`` is None."""
    for i, (p, w) in enumerate(zip(params, origin, strict=True)):
        p.copy_(w if eps is None else w + eps[i])


def _group_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    group: Sequence[Batch],
    params: Sequence[Tensor],
    scale: Sequence[Tensor] | None,
    rho: float,
    steps: int,
) -> tuple[float, float]:
    """``(L(w), max_t L(w+ε_t))`` on one group of batches, weights restored after."""
    origin = [p.detach().clone() for p in params]
    loss, grads = loss_and_gradient(model, loss_fn, group, params)
    delta = [torch.zeros_like(p) for p in params]
    best = None
    try:
        for step in range(steps):
            direction = grads if scale is None else [t * g for t, g in zip(scale, grads)]
            norm = _global_norm(direction)
            if norm == 0:  # a stationary point of the ascent: ε stays where it is
                break
            delta = [d + (rho / norm) * u for d, u in zip(delta, direction, strict=True)]
            delta_norm = _global_norm(delta)
            if delta_norm > rho:
                delta = [d * (rho / delta_norm) for d in delta]
            eps = delta if scale is None else [t * d for t, d in zip(scale, delta)]
            _set_weights(params, origin, eps)
            if step + 1 < steps:
                perturbed, grads = loss_and_gradient(model, loss_fn, group, params)
            else:
                with torch.no_grad():
                    perturbed = mean_loss(model, loss_fn, group)
            best = perturbed if best is None else torch.maximum(best, perturbed)
    finally:
        _set_weights(params, origin)
    if best is None:  # zero gradient at w: ε = 0
        best = loss
    return float(loss), float(best)


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    rho: float = 0.05,
    adaptive: str | None = None,
    m: int | None = None,
    steps: int = 1,
    *,
    eta: float | None = None,
    max_batches: int | None = None,
    train_mode_bn: bool = False,
    progress: Progress | None = None,
) -> SharpnessResult:
    """SAM sharpness ``L(w+ε) − L(w)`` with ``ε ≈ argmax_{‖ε‖≤ρ} L(w+ε)``.

    Args:
        model: the network; left exactly as it was (mode, weights, buffers, flags).
        loss_fn: ``loss_fn(model(x), y)`` → the mean loss of a batch.
        data: a batch ``(x, y)``, a list of batches or a DataLoader.
        rho: radius ``ρ`` of the ball (SAM's default 0.05).
        adaptive: ``None``, or ASAM's scaled ball, ``"weights"`` or ``"all"`` (see the
            module docstring); ``eta`` is its ``η`` (None: the form's default).
        m: m-sharpness sub-batch size; None perturbs once for all the data.
        steps: 1 for SAM's ε; more for projected ascent.
        max_batches: use only the first batches of ``data``.
        train_mode_bn: BatchNorm with batch statistics (restored afterwards).
        progress: optional wrapper around the loop over ε-groups, e.g. ``tqdm.tqdm``.

    Example, with a ``model``, its ``loss_fn`` and a DataLoader ``loader``:

    .. test: setup=model

    >>> result = sam_sharpness(model, loss_fn, loader, rho=0.05)
    >>> result.value == result.perturbed_loss - result.loss, result.num_groups
    (True, 1)
    >>> sam_sharpness(model, loss_fn, loader, rho=0.05, m=8).num_groups  # m-sharpness
    6
    """
    check_rho(rho)
    check_int("steps", steps, minimum=1)
    check_adaptive(adaptive)
    if eta is not None:
        check_real("eta", eta, minimum=0.0, hint="ASAM's η in T_w = |w| + η")
    with measuring(model, train_mode_bn):
        batches = collect_batches(data, max_batches, model_device(model))
        groups = [[b] for b in split_batches(batches, m)] if m is not None else [batches]
        named = trainable_parameters(model)
        params = [p for _, p in named]
        scale = _ball_scale(named, adaptive, eta)
        total = num_samples(batches)
        loss = perturbed = 0.0
        for group in progress(groups) if progress is not None else groups:
            weight = num_samples(group) / total
            group_loss, group_perturbed = _group_sharpness(
                model, loss_fn, group, params, scale, rho, steps
            )
            loss += weight * group_loss
            perturbed += weight * group_perturbed
    return SharpnessResult(
        value=perturbed - loss,
        loss=loss,
        perturbed_loss=perturbed,
        rho=float(rho),
        adaptive=adaptive,
        m=m,
        steps=steps,
        num_groups=len(groups),
        num_samples=total,
    )
