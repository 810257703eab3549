"""The data a measurement averages over, and the batch-size-weighted mean loss.

``data`` is one of

- a single batch, a tuple ``(x, y)`` of tensors;
- a list (or any iterable) of such batches;
- a ``torch.utils.data.DataLoader`` (its batches may carry extra items after ``(x, y)``,
  such as sample indices; they are ignored).

The batches are drawn once and kept (:func:`collect_batches`), so every loss, gradient
and Hessian-vector product of one measurement sees the same samples — a shuffling or
augmenting loader would otherwise change the function being measured between two
Lanczos iterations. The mean loss over batches is weighted by batch size,
``L = Σ_b n_b·L_b / Σ_b n_b``, which is the loss over all collected samples when
``loss_fn`` averages over its batch (as ``torch.nn.functional.cross_entropy`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatmin.optim._checks import check_int

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Batch:
    """One batch of inputs and targets on the model's device, with its sample count."""

    x: Tensor
    y: Tensor

    @property
    def size(self) -> int:
        return int(self.y.shape[0]) if self.y.dim() > 0 else int(self.x.shape[0])


def _is_single_batch(data: object) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(item, Tensor) for item in data)
    )


def _as_batch(item: object, index: int) -> Batch:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(
            f"batch {index} must be a tuple (x, y) of tensors, got {type(item).__name__}"
        )
    x, y = item[0], item[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"batch {index} must hold tensors (x, y), got ({type(x).__name__}, {type(y).__name__})"
        )
    if x.dim() == 0:
        raise ValueError(f"batch {index}: x must have a batch dimension, got a scalar")
    if y.dim() > 0 and y.shape[0] != x.shape[0]:
        raise ValueError(f"batch {index}: x has {x.shape[0]} samples but y has {y.shape[0]}")
    return Batch(x, y)


def collect_batches(
    data: object,
    max_batches: int | None = None,
    device: torch.device | None = None,
) -> list[Batch]:
    """Draw up to ``max_batches`` batches from ``data`` once, moved to ``device``."""
    if max_batches is not None:
        check_int("max_batches", max_batches, minimum=1, hint="or None for every batch")
    if _is_single_batch(data):
        items: Iterable[object] = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (Tensor, str, bytes)):
        items = data
    else:
        raise TypeError(
            "data must be a batch (x, y), a list of batches or a DataLoader, "
            f"got {type(data).__name__}"
        )
    batches = []
    for index, item in enumerate(items):
        if max_batches is not None and index >= max_batches:
            break
        batch = _as_batch(item, index)
        if device is not None:
            batch = Batch(batch.x.to(device), batch.y.to(device))
        batches.append(batch)
    if not batches:
        raise ValueError("data holds no batches")
    return batches


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for an empty model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def num_samples(batches: Sequence[Batch]) -> int:
    """How many samples the batches hold together."""
    return sum(batch.size for batch in batches)


def split_batches(batches: Sequence[Batch], m: int) -> list[Batch]:
    """Cut every batch into consecutive, disjoint sub-batches of ``m`` samples.

    The last sub-batch of a batch is smaller when its size is not a multiple of ``m``.
    """
    check_int("m", m, minimum=1, hint="the sub-batch size")
    out = []
    for batch in batches:
        for x, y in zip(batch.x.split(m), batch.y.split(m), strict=True):
            out.append(Batch(x, y))
    return out


def batch_loss(model: nn.Module, loss_fn: LossFn, batch: Batch) -> Tensor:
    """``loss_fn(model(x), y)``, checked to be a scalar."""
    loss = loss_fn(model(batch.x), batch.y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(
            "loss_fn must return a scalar tensor (the mean loss of its batch), got "
            f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}"
        )
    return loss


def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]) -> Tensor:
    """``Σ_b n_b·L_b / Σ_b n_b``: the batch-size-weighted mean loss, as a 0-d tensor.

    Differentiable when called with gradients enabled.
    """
    total = num_samples(batches)
    loss = None
    for batch in batches:
        term = batch_loss(model, loss_fn, batch) * (batch.size / total)
        loss = term if loss is None else loss + term
    assert loss is not None
    return loss


def loss_and_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    params: Sequence[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """The weighted mean loss and its gradient with respect to ``params``.

    The gradient is accumulated batch by batch with ``torch.autograd.grad``, so only one
    batch's graph is alive at a time and no parameter's ``.grad`` is touched. A
    parameter the loss does not depend on gets a zero gradient.
    """
    total = num_samples(batches)
    loss_sum = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    grads = [torch.zeros_like(p) for p in params]
    for batch in batches:
        weight = batch.size / total
        with torch.enable_grad():
            loss = batch_loss(model, loss_fn, batch) * weight
            parts = torch.autograd.grad(loss, list(params), allow_unused=True)
        loss_sum += loss.detach()
        for grad, part in zip(grads, parts, strict=True):
            if part is not None:
                grad.add_(part)
    return loss_sum, grads
