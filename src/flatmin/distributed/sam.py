r"""The SAM family under data parallelism: per-process ε, one averaged final gradient.

On ``W`` processes that each hold a shard ``B_r`` of the global batch, SAM as run by its
authors (Foret et al., ICLR 2021, Sec. 4.1 "m-sharpness") perturbs each process with its
*own* gradient and averages only the final gradients:

.. math::

    g_r = ∇L_{B_r}(w),\quad ε_r = ρ\,g_r/\lVert g_r\rVert_2,\quad
    g = \frac1W \sum_r ∇L_{B_r}(w + ε_r),\quad w ← \mathrm{base\_step}(w, g)

so the sharpness that is minimized is the m-sharpness with ``m = |B_r|``, and smaller m
generalizes better. A plain ``DistributedDataParallel`` loop gets this wrong: DDP
all-reduces in the first backward too, so every process perturbs with the global
gradient — at the cost of an extra all-reduce. The first pass therefore runs inside
``ddp_model.no_sync()`` — forward *and* backward, since DDP decides at the forward
whether the next backward synchronizes:

.. test: setup=ddp_model processes=2

::

    with first_pass(ddp_model):                      # no gradient all-reduce
        loss_fn(ddp_model(x), y).backward()
    opt.first_step(zero_grad=True)                   # w + ε_r, this process's own ε
    with running_stats_frozen(ddp_model):
        loss_fn(ddp_model(x), y).backward()          # DDP averages ∇L(w + ε_r)
    opt.second_step(zero_grad=True)

or, in one call, ``loss = sam_step(opt, ddp_model, closure)``. ``perturbation="global"``
perturbs every process with the averaged gradient ``ε = ρ·ḡ/‖ḡ‖`` instead (the first
backward then synchronizes as usual — DDP's bucketed all-reduce, overlapped with the
backward); with a module that is not wrapped in DDP the helper averages the gradients
itself (:func:`~flatmin.distributed.average_gradients`, no host sync).

**BatchNorm.** Statistics move once per step, from the first pass (the second runs under
:func:`~flatmin.optim.running_stats_frozen`). Each process updates them from its own
shard, so without care they drift apart between DDP's broadcasts: with
``broadcast_buffers=True`` DDP copies rank 0's buffers at the start of the next
*synchronizing* forward, which after a ``no_sync`` first pass is the next step's first
pass, so a checkpoint or an evaluation in between would see per-rank statistics. On
leaving :func:`~flatmin.distributed.first_pass` the running statistics are therefore made identical right
away (``statistics="mean"``, default: averaged over ranks, so every sample counts and
the result equals one process running the m-sharpness step with the same sub-batches;
``"broadcast"``: rank 0's, DDP's own rule; ``"none"``: DDP's behaviour unchanged). With
``"mean"`` DDP's broadcast becomes a no-op; pass ``broadcast_buffers=False`` to save it.

**Which optimizers.** Every member of the SAM family declares what its update needs
(:class:`flatmin.SAM`'s traits). When ``optimizer.uses_clean_gradient`` is False
(SAM, ASAM, USAM, ESAM) the update is the surrogate gradient itself, so DDP's average
of ``g_s`` in the second backward is all it takes. When it is True (StableSAM, GSAM,
LookSAM, any member with ``stable=True``) the update transforms ``g_s`` with the
first-pass gradient, under per-process ε each process's own ``g_r``; averaging ``g_s``
alone would pair it with a local ``g_r`` and let the replicas drift apart. So
:func:`~flatmin.distributed.sam_step` runs *both* passes without gradient synchronization, lets each process
compute its own direction and averages only that final direction — before clipping and
the base step — through the engine's :attr:`~flatmin.SAM.replica_mean` hook:

.. math::

    d_r &= γ_r\,g_{s,r},\quad γ_r = \frac{\lVert g_r\rVert}{\lVert g_{s,r}\rVert}
    \quad \text{(StableSAM)}, \qquad d_r = g_{s,r} − α\,g_{⊥,r} \quad \text{(GSAM)},\\
    w &← \mathrm{base\_step}\Big(w, \frac1W \sum_r d_r\Big)

with ``g_⊥,r = g_r − (⟨g_r,g_s,r⟩/‖g_s,r‖²)·g_s,r`` (one gradient-sized all-reduce
per step, as for SAM; DDP synchronizes no backward here, so it broadcasts buffers
only at the very first forward, and ``statistics="none"`` leaves them per-rank).
LookSAM's full steps update with ``g_s`` and keep the mean over processes of their
``g_v,r = g_s,r − (⟨g_r,g_s,r⟩/‖g_r‖²)·g_r``, so its persistent state stays identical
on every process (rank 0's checkpoint resumes all); its reuse steps average
``g_r + α(‖g_r‖/‖g_v‖)·g_v`` (a full step costs a second all-reduce, for ``g_v``).
The explicit :func:`~flatmin.distributed.first_pass` loop above is the averaged-gradient form only.
``perturbation="global"`` runs every optimizer with the averaged ``g`` instead.

**ESAM** (``optimizer.per_sample_closure``): the closure takes optional row indices and
returns per-sample losses without calling backward (:class:`flatmin.ESAM`).
:func:`~flatmin.distributed.sam_step` runs ESAM's own passes (:meth:`~flatmin.SAM.run_first_pass`,
:meth:`~flatmin.SAM.run_second_pass`): the first backward without
synchronization, so each process perturbs the same tensors (ESAM's draw depends on its
seed and step count only) with its own gradient; each process selects its own
``⌈γ·B_r⌉`` samples; DDP averages the second gradient.

**FSDP2** (a model sharded with ``torch.distributed.fsdp.fully_shard``). Every process
holds only its shard of each parameter, and the backward reduce-scatters the *averaged*
gradient, so no process ever has its own full ``g_r``: per-process ε cannot be formed,
and ``perturbation="local"`` is refused with an error that says so. With
``perturbation="global"`` the step is the SAM-family step on the global batch, computed
on the shards (``flatmin.optim._buckets``: ε and the restore act on the local shards,
each norm or dot product costs one all-reduce of a scalar, the base optimizer's state
stays sharded): with equal per-process batches it equals one process stepping on the
whole batch, for every member. ESAM's data selection is then global too: the per-sample
loss rises are all-gathered (``B`` numbers) and the ``⌈γ·B⌉`` largest of the global
batch are used (:attr:`flatmin.ESAM.sample_gather`). m-sharpness under FSDP2 is
:func:`~flatmin.distributed.m_sharpness_step`: each sub-batch's ε is global
over the processes' sub-batches, so it has ``m = W·m_local``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from flatmin.distributed.collectives import (
    STATISTICS_SYNCS,
    ProcessGroup,
    StatisticsSync,
    all_gather_rows,
    average_gradients,
    average_tensors,
    sync_norm_statistics,
    world_size,
)
from flatmin.distributed.fsdp import is_sharded
from flatmin.optim._checks import check_choice
from flatmin.optim.bn import running_stats_frozen

Perturbation = Literal["local", "global"]
PERTURBATIONS = ("local", "global")


def _check_options(perturbation: str, statistics: str, model: nn.Module) -> bool:
    """Check the options; returns whether ``model`` is sharded by FSDP2."""
    check_choice("perturbation", perturbation, PERTURBATIONS)
    check_choice("statistics", statistics, STATISTICS_SYNCS)
    sharded = is_sharded(model)
    if sharded and perturbation == "local":
        raise ValueError(
            "perturbation='local' (per-process ε) needs each process's own full gradient, "
            "which a model sharded by FSDP2 (fully_shard) never holds: its backward "
            "reduce-scatters the gradient averaged over processes. Pass "
            "perturbation='global' (the step then equals SAM on the global batch), or use "
            "m_sharpness_step for m-sharpness"
        )
    return sharded


def _group_of(model: nn.Module, group: ProcessGroup) -> ProcessGroup:
    if group is None and isinstance(model, DistributedDataParallel):
        return model.process_group
    return group


@contextmanager
def first_pass(
    model: nn.Module,
    perturbation: Perturbation = "local",
    statistics: StatisticsSync = "mean",
    process_group: ProcessGroup = None,
) -> Iterator[nn.Module]:
    """Context for the first forward *and* backward of a SAM-family step.

    ``perturbation="local"``: a DDP model skips its gradient all-reduce
    (``model.no_sync()``), so each process keeps its own gradient and perturbs with its
    own ε. ``"global"``: gradients are averaged (by DDP, or on exit for a plain module).
    On exit the norm layers' running statistics are synchronized as ``statistics`` says.
    A model sharded by FSDP2 takes ``"global"`` only (its backward averages).
    """
    sharded = _check_options(perturbation, statistics, model)
    group = _group_of(model, process_group)
    is_ddp = isinstance(model, DistributedDataParallel)
    no_sync = model.no_sync() if is_ddp and perturbation == "local" else nullcontext()
    with no_sync:
        yield model
    if perturbation == "global" and not is_ddp and not sharded:
        average_gradients(model.parameters(), group)
    sync_norm_statistics(model, statistics, group)


@contextmanager
def _selection_over_processes(optimizer: Optimizer, group: ProcessGroup) -> Iterator[None]:
    def gather(values: Tensor) -> tuple[Tensor, int, int]:
        return (*all_gather_rows(values, group), world_size(group))

    optimizer.sample_gather = gather
    try:
        yield
    finally:
        optimizer.sample_gather = None


@contextmanager
def _directions_averaged(optimizer: Optimizer, group: ProcessGroup) -> Iterator[None]:
    optimizer.replica_mean = lambda tensors: average_tensors(tensors, group)
    try:
        yield
    finally:
        optimizer.replica_mean = None


def agree_on_nonfinite_gradients(parameters: Iterable[Tensor], group: ProcessGroup = None) -> None:
    """If any process's gradient is not finite, make every process's gradient non-finite.

    With per-process first passes, ``skip_nonfinite`` would otherwise skip the step on
    one process and take it on another. One scalar all-reduce; no host synchronization.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or world_size(group) == 1:
        return
    finite = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(grads)]).all()
    flag = finite.to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    grads[0].mul_(torch.where(flag > 0, 1.0, float("nan")).to(grads[0].dtype))


_TWO_PASS_METHODS = (
    "first_step",
    "second_step",
    "restore_weights",
    "abandon_step",
    "run_first_pass",
    "run_second_pass",
)
_TWO_PASS_ATTRIBUTES = ("is_perturbed", "uses_clean_gradient", "per_sample_closure", "replica_mean")


def check_two_pass(optimizer: Optimizer) -> None:
    """Raise a TypeError unless ``optimizer`` has the SAM family's two-pass interface and
    declares its traits (``uses_clean_gradient``, ``per_sample_closure``), as every
    :class:`flatmin.SAM` subclass does."""
    missing = [name for name in _TWO_PASS_METHODS if not callable(getattr(optimizer, name, None))]
    missing += [name for name in _TWO_PASS_ATTRIBUTES if not hasattr(optimizer, name)]
    if missing:
        raise TypeError(
            "expected a two-pass optimizer of the SAM family (a flatmin.optim.SAM "
            f"subclass); {type(optimizer).__name__} lacks {', '.join(missing)}"
        )


def sam_step(
    optimizer: Optimizer,
    model: nn.Module,
    closure: Callable[..., Tensor],
    *,
    perturbation: Perturbation = "local",
    statistics: StatisticsSync = "mean",
    process_group: ProcessGroup = None,
) -> Tensor:
    """One SAM-family step on ``model`` (DDP-wrapped or not) in a process group.

    ``closure`` is the optimizer's own (see its ``per_sample_closure``): for most members
    it runs forward and backward on this process's shard and returns the loss; for ESAM
    it returns per-sample losses without backward. It runs at ``w`` inside
    :func:`~flatmin.distributed.first_pass` and at ``w + ε`` with the running statistics frozen (only at
    ``w`` on a step that ``first_step`` completes by itself, as LookSAM's reuse steps).
    Returns this process's first-pass loss. If the second pass raises, the weights are
    restored before the exception propagates.

    With ``perturbation="local"``, an optimizer whose ``uses_clean_gradient`` is True
    runs both passes without gradient synchronization and averages its final direction
    instead of ``g_s``. A model sharded by FSDP2 needs ``perturbation="global"`` (see the
    module docstring); ESAM then selects samples over the global batch.

    Example, on every process:

    .. test: setup=ddp_model processes=2

    ::

        loss = sam_step(opt, ddp_model, lambda: (l := loss_fn(ddp_model(x), y)).backward() or l)
    """
    sharded = _check_options(perturbation, statistics, model)
    check_two_pass(optimizer)
    by_direction = perturbation == "local" and optimizer.uses_clean_gradient
    group = _group_of(model, process_group)
    is_ddp = isinstance(model, DistributedDataParallel)
    synchronized_first_backward = is_ddp and perturbation == "global"
    averaging = _directions_averaged(optimizer, group) if by_direction else nullcontext()
    if sharded and optimizer.per_sample_closure and hasattr(optimizer, "sample_gather"):
        averaging = _selection_over_processes(optimizer, group)
    with torch.enable_grad(), first_pass(model, perturbation, statistics, group):
        loss = optimizer.run_first_pass(
            closure, skip_unused_gradients=not synchronized_first_backward
        )
    if perturbation == "local" and getattr(optimizer, "skip_nonfinite", False):
        agree_on_nonfinite_gradients(model.parameters(), group)
    with averaging:
        optimizer.first_step(zero_grad=True)  # LookSAM's reuse steps update here
        if not optimizer.is_perturbed:  # a one-pass step is complete
            return loss
        second_sync = model.no_sync() if by_direction and is_ddp else nullcontext()
        try:
            with torch.enable_grad(), running_stats_frozen(model), second_sync:
                optimizer.run_second_pass(closure)
        except BaseException:
            optimizer.abandon_step()
            raise
        if not is_ddp and not by_direction and not sharded:
            average_gradients(model.parameters(), group)
        optimizer.second_step(zero_grad=True)
    return loss


__all__ = [
    "PERTURBATIONS",
    "Perturbation",
    "agree_on_nonfinite_gradients",
    "check_two_pass",
    "first_pass",
    "sam_step",
]
