"""Loss landscapes along random directions or between two checkpoints.

Random-direction plots follow Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss
Landscape of Neural Nets" (NeurIPS 2018): the loss ``L(w + α·d₁ + β·d₂)`` on a grid of
``(α, β)``, with Gaussian directions ``dᵢ ~ N(0, I)`` that are *filter-normalized*: each
filter (a slice along the first dimension of a weight tensor — an output neuron of a
linear layer, an output channel of a convolution) is rescaled to the norm of the
matching filter of the weights, ``d_{i,j} ← d_{i,j}·‖w_j‖/‖d_{i,j}‖``. Parameters with at
most one dimension (biases and the scales and shifts of norm layers) get a zero
direction by default, as in the paper; when included they are normalized as a single
filter.

With ``other`` (a state dict of the same model) the 1-D curve is the linear
interpolation ``L((1−t)·w + t·w_other)`` of Goodfellow, Vinyals & Saxe (ICLR 2015); only
the trainable parameters are interpolated, buffers stay the model's.

Every grid point is set from a saved copy of the weights (``w + α·d``, never by
accumulating steps), and the weights are restored exactly afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from flatmin.measure._state import measuring, trainable_parameters
from flatmin.measure.batches import (
    Batch,
    LossFn,
    collect_batches,
    mean_loss,
    model_device,
    num_samples,
)
from flatmin.optim._checks import check_choice, check_int, check_real

Progress = Callable[[Iterable], Iterable]
Normalization = Literal["filter", "layer"] | None


@dataclass(frozen=True)
class LandscapeResult:
    """The loss on a grid: ``losses[i]`` (1-D) or ``losses[i, j]`` (2-D).

    ``losses[i, j]`` is taken at ``(coords[0][i], coords[1][j])``.

    ``center_loss`` is ``L(w)``; for an interpolation ``coords[0]`` holds ``t`` and
    ``kind`` is ``"interpolation"``.
    """

    coords: list[np.ndarray]
    losses: np.ndarray
    center_loss: float
    dims: int
    kind: str
    normalization: str | None
    num_samples: int
    seed: int
    extra: dict = field(default_factory=dict)


def filter_normalize(direction: Tensor, weight: Tensor) -> Tensor:
    """Rescale each filter of ``direction`` to the norm of the matching filter of ``weight``.

    A filter is a slice along dimension 0 of a tensor with at least two dimensions; a
    tensor with at most one dimension is one filter.
    """
    if direction.shape != weight.shape:
        raise ValueError(
            f"direction shape {tuple(direction.shape)} != weight shape {tuple(weight.shape)}"
        )
    if weight.dim() <= 1:
        return direction * (weight.norm() / direction.norm().clamp_min(_tiny(direction)))
    d = direction.reshape(direction.shape[0], -1)
    w = weight.reshape(weight.shape[0], -1)
    ratio = w.norm(dim=1, keepdim=True) / d.norm(dim=1, keepdim=True).clamp_min(_tiny(d))
    return (d * ratio).reshape(direction.shape)


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


def random_direction(
    params: Sequence[Tensor],
    generator: torch.Generator,
    normalization: Normalization = "filter",
    include_biases_and_norms: bool = False,
) -> list[Tensor]:
    """One Gaussian direction in parameter space, normalized per filter or per tensor.

    ``"filter"`` applies :func:`filter_normalize`; ``"layer"`` rescales each tensor to
    the norm of its weight; None keeps the raw ``N(0, I)`` sample. Parameters with at
    most one dimension get zeros unless ``include_biases_and_norms``.
    """
    check_choice("normalization", normalization, ("filter", "layer", None))
    direction = []
    for p in params:
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1 and not include_biases_and_norms:
            d = torch.zeros_like(w)
        elif normalization == "filter":
            d = filter_normalize(d, w)
        elif normalization == "layer":
            d = d * (w.norm() / d.norm().clamp_min(_tiny(d)))
        direction.append(d)
    if all(not bool(d.any()) for d in direction):
        raise ValueError(
            "every direction component is zero: the model has no parameter with two or "
            "more dimensions (pass include_biases_and_norms=True)"
        )
    return direction


def grid(steps: int, low: float, high: float) -> np.ndarray:
    """``steps`` evenly spaced points from ``low`` to ``high``; the midpoint of a
    symmetric odd grid is exactly 0."""
    check_int("steps", steps, minimum=2)
    fraction = np.arange(steps, dtype=np.float64) / (steps - 1)
    if low == -high:
        return high * (2 * fraction - 1)
    return low + (high - low) * fraction


@torch.no_grad()
def _loss_at(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    params: Sequence[Tensor],
    origin: Sequence[Tensor],
    offsets: Sequence[tuple[float, Sequence[Tensor]]],
) -> float:
    """``L(origin + Σ c·d)`` over ``offsets = [(c, d), …]``."""
    for i, (p, w) in enumerate(zip(params, origin, strict=True)):
        value = w.clone()
        for coefficient, direction in offsets:
            if coefficient != 0:
                value.add_(direction[i], alpha=coefficient)
        p.copy_(value)
    return float(mean_loss(model, loss_fn, batches))


def _interpolation_direction(
    named: Sequence[tuple[str, Tensor]], other: Mapping[str, Tensor]
) -> list[Tensor]:
    direction = []
    for name, p in named:
        if name not in other:
            raise ValueError(f"state dict `other` has no entry for parameter {name!r}")
        target = torch.as_tensor(other[name])
        if target.shape != p.shape:
            raise ValueError(
                f"`other[{name!r}]` has shape {tuple(target.shape)}, "
                f"the model's parameter has {tuple(p.shape)}"
            )
        direction.append(target.to(device=p.device, dtype=p.dtype) - p.detach())
    return direction


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    dims: int = 2,
    steps: int = 21,
    span: float = 1.0,
    normalization: Normalization = "filter",
    *,
    seed: int = 0,
    include_biases_and_norms: bool = False,
    other: Mapping[str, Tensor] | None = None,
    t_range: tuple[float, float] = (-0.5, 1.5),
    max_batches: int | None = None,
    train_mode_bn: bool = False,
    progress: Progress | None = None,
) -> LandscapeResult:
    """The loss on a 1-D or 2-D grid around ``w`` (or between ``w`` and ``other``).

    Args:
        dims: 1 (``L(w + α·d₁)``) or 2 (``L(w + α·d₁ + β·d₂)``).
        steps: grid points per axis (odd, to include the centre exactly).
        span: the grid runs over ``[−span, span]`` along each direction.
        normalization: ``"filter"`` (Li et al.), ``"layer"`` or None.
        seed: seeds the directions (a private generator; the global RNG is untouched).
        include_biases_and_norms: also move parameters with at most one dimension.
        other: a state dict; gives the interpolation ``L((1−t)·w + t·w_other)`` for
            ``t`` over ``t_range`` instead of random directions (``dims`` must be 1).
        max_batches, train_mode_bn, progress: as in :func:`~flatmin.measure.sam_sharpness`.

    Example, a coarse 2-D grid (``result.losses[i, j]`` is the loss at
    ``coords[0][i], coords[1][j]``; ``flatmin.measure.plots`` draws it):

    .. test: setup=model

    >>> surface = loss_landscape(model, loss_fn, loader, dims=2, steps=5, span=0.5)
    >>> surface.losses.shape, bool(surface.losses[2, 2] == surface.center_loss)
    ((5, 5), True)
    """
    check_choice("dims", dims, (1, 2))
    check_real("span", span, minimum=0.0, exclusive_minimum=True)
    if other is not None and dims != 1:
        raise ValueError("interpolation towards `other` is one-dimensional: pass dims=1")
    generator = torch.Generator().manual_seed(seed)
    with measuring(model, train_mode_bn):
        batches = collect_batches(data, max_batches, model_device(model))
        named = trainable_parameters(model)
        params = [p for _, p in named]
        origin = [p.detach().clone() for p in params]
        if other is not None:
            directions = [_interpolation_direction(named, other)]
            coords = [grid(steps, *t_range)]
        else:
            directions = [
                random_direction(params, generator, normalization, include_biases_and_norms)
                for _ in range(dims)
            ]
            coords = [grid(steps, -span, span) for _ in range(dims)]
        with torch.no_grad():
            center_loss = float(mean_loss(model, loss_fn, batches))
        points = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1).reshape(-1, dims)
        losses = np.empty(len(points))
        indices = range(len(points))
        for index in progress(indices) if progress is not None else indices:
            offsets = [(float(c), d) for c, d in zip(points[index], directions, strict=True)]
            losses[index] = _loss_at(model, loss_fn, batches, params, origin, offsets)
    return LandscapeResult(
        coords=coords,
        losses=losses.reshape([steps] * dims),
        center_loss=center_loss,
        dims=dims,
        kind="interpolation" if other is not None else "random",
        normalization=None if other is not None else normalization,
        num_samples=num_samples(batches),
        seed=seed,
        extra={"span": span} if other is None else {"t_range": list(t_range)},
    )
