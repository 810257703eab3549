"""Loss under Gaussian weight noise scaled to the weights' norm.

The SAF paper (Du et al., NeurIPS 2022, arXiv 2205.14083; poster Figure 4) compares
minima by the loss under Gaussian perturbations of 0.07 of the weights' norm. Here the
perturbation at scale ``σ`` is ``σ·d`` with ``d`` a filter-normalized Gaussian direction
(:func:`~flatmin.measure.loss_landscape`'s ``random_direction``): every filter's noise has norm
``σ·‖w_filter‖``, so ``‖σ·d‖ = σ·‖w‖`` over the perturbed tensors. The curve reports, per
scale, the mean and the standard deviation over ``repeats`` independent draws of
``L(w + σ·d)``; a flatter minimum has a lower, slower-rising curve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flatmin.measure._state import measuring, trainable_parameters
from flatmin.measure.batches import LossFn, collect_batches, mean_loss, model_device, num_samples
from flatmin.measure.landscape import Normalization, random_direction
from flatmin.optim._checks import check_int, check_real

Progress = Callable[[Iterable], Iterable]

DEFAULT_SCALES = (0.0, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1)


@dataclass(frozen=True)
class NoiseCurveResult:
    """``losses[i, r]`` = loss at ``scales[i]`` for draw ``r``, with its mean and std."""

    scales: list[float]
    losses: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    repeats: int
    num_samples: int
    seed: int


def gaussian_noise_curve(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    scales: Sequence[float] = DEFAULT_SCALES,
    repeats: int = 5,
    *,
    seed: int = 0,
    normalization: Normalization = "filter",
    include_biases_and_norms: bool = False,
    max_batches: int | None = None,
    train_mode_bn: bool = False,
    progress: Progress | None = None,
) -> NoiseCurveResult:
    """The loss ``L(w + σ·d)`` for each ``σ`` in ``scales``, over ``repeats`` draws of ``d``.

    Args:
        scales: noise scales ``σ`` as fractions of the weights' (filter) norms.
        repeats: independent Gaussian draws per scale (at least 1).
        seed: seeds the draws (a private generator; the global RNG is untouched).
        normalization, include_biases_and_norms: as in
            :func:`~flatmin.measure.loss_landscape`'s ``random_direction``.
        max_batches, train_mode_bn, progress: as in :func:`~flatmin.measure.sam_sharpness`.

    Example, the mean and spread of the loss over three draws per scale:

    .. test: setup=model

    >>> curve = gaussian_noise_curve(model, loss_fn, loader, scales=[0.0, 0.1, 0.5], repeats=3)
    >>> curve.losses.shape, curve.mean.shape
    ((3, 3), (3,))
    """
    scales = [check_real(f"scales[{i}]", s, minimum=0.0) for i, s in enumerate(scales)]
    if not scales:
        raise ValueError("scales must be a non-empty list of numbers >= 0, got []")
    check_int("repeats", repeats, minimum=1)
    generator = torch.Generator().manual_seed(seed)
    losses = np.empty((len(scales), repeats))
    with measuring(model, train_mode_bn):
        batches = collect_batches(data, max_batches, model_device(model))
        params = [p for _, p in trainable_parameters(model)]
        origin = [p.detach().clone() for p in params]
        draws = range(repeats)
        for r in progress(draws) if progress is not None else draws:
            direction = random_direction(origin, generator, normalization, include_biases_and_norms)
            for i, scale in enumerate(scales):
                with torch.no_grad():
                    for p, w, d in zip(params, origin, direction, strict=True):
                        p.copy_(w + scale * d)
                    losses[i, r] = float(mean_loss(model, loss_fn, batches))
    return NoiseCurveResult(
        scales=scales,
        losses=losses,
        mean=losses.mean(axis=1),
        std=losses.std(axis=1, ddof=1) if repeats > 1 else np.zeros(len(scales)),
        repeats=repeats,
        num_samples=num_samples(batches),
        seed=seed,
    )
