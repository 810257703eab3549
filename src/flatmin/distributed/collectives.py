"""The few collectives data-parallel training needs, each over a whole list at once.

* :func:`~flatmin.distributed.average_gradients` — ``g ← (1/W)·Σ_r g_r`` for parameters
  of a module that is not wrapped in ``DistributedDataParallel`` (one all-reduce per
  device and dtype); ``average_tensors`` — the same for any list of tensors.
* :func:`~flatmin.distributed.sync_norm_statistics` — make BatchNorm running statistics
  equal on every rank, by their mean over ranks or by rank 0's copy.
* :func:`~flatmin.distributed.reduce_metrics` — average (or sum) a dict of logged numbers
  across ranks.
* :func:`~flatmin.distributed.collectives.all_gather_rows` — every rank's rows of a tensor,
  concatenated in rank order.
* :func:`~flatmin.distributed.max_replica_difference` — how far a replicated tensor list
  is from rank 0's.

All of them are collectives: every rank of the group must call them in the same order.
With no initialized process group they act on the single process (``W = 1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

ProcessGroup = dist.ProcessGroup | None
StatisticsSync = Literal["mean", "broadcast", "none"]
STATISTICS_SYNCS = ("mean", "broadcast", "none")


def world_size(group: ProcessGroup = None) -> int:
    """Number of processes in ``group`` (1 without an initialized process group)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _by_device_and_dtype(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _all_reduce_mean_(tensors: list[Tensor], group: ProcessGroup) -> None:
    """In place: every tensor becomes its mean over ranks (one flat all-reduce per dtype)."""
    size = world_size(group)
    if size == 1 or not tensors:
        return
    for same in _by_device_and_dtype(tensors):
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        torch._foreach_copy_(
            same, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in same]), same)]
        )


def average_tensors(tensors: list[Tensor], group: ProcessGroup = None) -> None:
    """Replace each tensor, in place, by its mean over the ranks of ``group``.

    Every rank must pass tensors of the same shapes, dtypes and order. One flat
    all-reduce per device and dtype; no host synchronization.
    """
    _all_reduce_mean_(list(tensors), group)


def average_gradients(parameters: Iterable[Tensor], group: ProcessGroup = None) -> None:
    """Replace each ``p.grad`` by its mean over the ranks of ``group``.

    For a model that is *not* wrapped in DDP (DDP averages during ``backward``).
    Parameters without a gradient are skipped, so every rank must have gradients for the
    same parameters. No host synchronization: the reduction works on device tensors.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if any(g.is_sparse for g in grads):
        raise TypeError("average_gradients supports dense gradients only")
    _all_reduce_mean_(grads, group)


def norm_statistics(model: nn.Module) -> list[Tensor]:
    """The floating-point running statistics (mean, variance) of ``model``'s norm layers."""
    stats = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.running_mean is not None:
            stats.extend(t for t in (module.running_mean, module.running_var) if t is not None)
    return stats


def sync_norm_statistics(
    model: nn.Module, how: StatisticsSync = "mean", group: ProcessGroup = None
) -> None:
    """Make the norm layers' running statistics identical on every rank.

    ``"mean"``: each running mean and variance becomes its average over ranks. After one
    momentum update from each rank's batch statistics ``s_r``, starting from a shared
    value ``v``, that is ``(1−μ)·v + μ·mean_r(s_r)``: the statistics moved once, with
    every rank's samples. ``"broadcast"``: rank 0's copy wins, as DDP's
    ``broadcast_buffers=True`` does at the next forward. ``"none"``: leave them alone.
    ``num_batches_tracked`` is not touched: every rank increments it alike.
    """
    if how not in STATISTICS_SYNCS:
        raise ValueError(f"expected how to be one of {STATISTICS_SYNCS}, got {how!r}")
    if how == "none" or world_size(group) == 1:
        return
    stats = norm_statistics(model)
    if how == "mean":
        _all_reduce_mean_(stats, group)
        return
    for same in _by_device_and_dtype(stats):
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        torch._foreach_copy_(
            same, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in same]), same)]
        )


def reduce_metrics(
    metrics: Mapping[str, float | int | Tensor],
    op: Literal["mean", "sum"] = "mean",
    group: ProcessGroup = None,
) -> dict[str, float]:
    """Reduce a dict of scalars across ranks in one all-reduce; returns Python floats.

    Call it on every rank with the same keys (in any order); log the result on rank 0.
    ``"mean"`` is right for per-rank averages over equally sized shards (loss, accuracy
    of a batch); for unequal shards reduce sums and counts with ``op="sum"`` and divide.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"expected op 'mean' or 'sum', got {op!r}")
    keys = sorted(metrics)
    for key in keys:
        value = metrics[key]
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(f"expected scalar metrics, got shape {tuple(value.shape)} for {key!r}")
        if not isinstance(value, (Tensor, int, float)) or isinstance(value, bool):
            raise TypeError(f"expected a number or a scalar tensor for {key!r}, got {value!r}")
    values = torch.tensor(
        [
            float(metrics[k].detach()) if isinstance(metrics[k], Tensor) else float(metrics[k])
            for k in keys
        ],
        dtype=torch.float64,
    )
    size = world_size(group)
    if size > 1:
        dist.all_reduce(values, group=group)
        if op == "mean":
            values /= size
    return dict(zip(keys, values.tolist()))


def all_gather_rows(tensor: Tensor, group: ProcessGroup = None) -> tuple[Tensor, int]:
    """Every rank's ``tensor`` concatenated along dimension 0 in rank order, and this
    rank's offset in it. The ranks may hold different numbers of rows (the trailing
    shapes and the dtype must agree). Two all-gathers: the row counts, then the rows
    padded to the largest count; the counts cost a host synchronization.

    Example: rank 0 holds ``[1., 2.]``, rank 1 ``[3.]`` → both get ``[1., 2., 3.]``,
    with offsets 0 and 2.
    """
    size = world_size(group)
    if size == 1:
        return tensor, 0
    counts = torch.empty(size, dtype=torch.long, device=tensor.device)
    dist.all_gather_single(
        counts, torch.tensor([tensor.shape[0]], device=tensor.device), group=group
    )
    counts = counts.tolist()
    most = max(counts)
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = tensor.new_empty((size * padded.numel(),))  # gloo wants a flat output
    dist.all_gather_single(gathered, padded.reshape(-1), group=group)
    gathered = gathered.view(size, most, *tensor.shape[1:])
    rows = torch.cat([gathered[r, :count] for r, count in enumerate(counts)])
    return rows, sum(counts[: dist.get_rank(group)])


def max_replica_difference(tensors: Iterable[Tensor], group: ProcessGroup = None) -> float:
    """Largest absolute difference between this rank's tensors and rank 0's (0.0 if equal).

    A check for replicated state (DDP weights, MESA teachers, SAF stores); integer and
    boolean tensors are compared as float64, NaN equals NaN (a NaN on one rank only
    counts as ``inf``). Every rank gets the same answer; every rank must pass tensors of
    the same shapes.
    """
    tensors = list(tensors)
    if world_size(group) == 1 or not tensors:
        return 0.0
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    both_nan = flat.isnan() & reference.isnan()
    gaps = torch.where(both_nan, 0.0, (flat - reference).abs().nan_to_num(nan=float("inf")))
    diff = gaps.max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
    return float(diff)
