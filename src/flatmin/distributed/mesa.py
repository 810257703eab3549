"""MESA on several processes: a teacher that stays identical on every process.

MESA's teacher is an EMA of the student's weights *and buffers* (Du et al., NeurIPS
2022). Under DDP the weights are identical on every process after each step, so equal
teachers need two more things, which :class:`DistributedMESA` provides:

1. **The same start.** ``MESA(model)`` copies the model when it is built. Built before
   ``DistributedDataParallel(model)`` has broadcast rank 0's weights, each process would
   copy its own initialization; the wrapper therefore broadcasts rank 0's teacher once.
2. **The same buffers.** BatchNorm running statistics are updated from each process's
   own batch in the forward pass and DDP only broadcasts rank 0's copy at the start of
   the *next* forward. An EMA step taken in between would average per-process
   statistics into per-process teachers. :meth:`~flatmin.distributed.DistributedMESA.update` first makes the
   student's statistics identical (``statistics="broadcast"``: rank 0's, which is what
   DDP would do a moment later anyway; ``"mean"``: their average), then takes the step
   (for a teacher MESA built; the owner of a teacher passed to MESA updates it after).

Cost: one broadcast of the norm statistics per step (negligible next to DDP's own).

**FSDP2.** A sharded student cannot be deep-copied, so build MESA on the plain model
first and shard its teacher exactly as the student (every process seeded alike, as FSDP2
needs for the student anyway: each keeps its own rows of the same initialisation), here
for a ``Net`` made of ``blocks``:

.. test: setup=fsdp_net processes=2

::

    from torch.distributed.fsdp import fully_shard

    model = Net()                                   # the same seed on every process
    mesa = MESA(model, fold_batchnorm=False, teacher_memory_format=None)
    for module in (model, mesa.teacher):            # the same plan for both
        for block in module.blocks:
            fully_shard(block)
        fully_shard(module)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    mesa = DistributedMESA(mesa)

Each process then holds its shards of the teacher (``≈ 1/W`` of it): the EMA step runs on
the local shards (:class:`~flatmin.trajectory.ema.EMA`), the teacher's forward gathers one
layer at a time as any FSDP2 forward does, and the wrapper reshards the teacher after it —
a forward without a backward would otherwise leave the root's gathered weights in place —
and reshards the student before the EMA step, so that the step reads the shards. Its
checkpoint is sharded too (``state_dict()`` holds ``DTensor`` shards: save it with
:mod:`~flatmin.distributed.sharded_checkpoint`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flatmin.distributed.collectives import (
    STATISTICS_SYNCS,
    ProcessGroup,
    StatisticsSync,
    sync_norm_statistics,
    world_size,
)
from flatmin.distributed.fsdp import is_sharded, reshard
from flatmin.optim._checks import check_choice
from flatmin.trajectory.mesa import MESA


class DistributedMESA:
    """Wrap a :class:`flatmin.MESA` built on the *unwrapped* model (``ddp_model.module``).

    Use it like MESA on every process: ``set_epoch(epoch)`` at the start of every epoch
    (without it the term stays 0.0), :meth:`update` after every optimizer step (a
    collective):

    .. test: setup=ddp_model processes=2 check="mesa.active"

    ::

        mesa = DistributedMESA(MESA(ddp_model.module))
        opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            mesa.set_epoch(epoch)
            for x, y in loader:
                logits = ddp_model(x)
                loss = F.cross_entropy(logits, y) + mesa(x, logits)
                opt.zero_grad(); loss.backward(); opt.step()
                mesa.update()
    """

    def __init__(
        self,
        mesa: MESA,
        statistics: StatisticsSync = "broadcast",
        process_group: ProcessGroup = None,
    ) -> None:
        if not isinstance(mesa, MESA):
            raise TypeError(f"expected a flatmin.MESA to wrap, got {type(mesa).__name__}")
        check_choice("statistics", statistics, STATISTICS_SYNCS)
        self.mesa = mesa
        self.statistics = statistics
        self.process_group = process_group
        self._broadcast_teacher()

    @torch.no_grad()
    def _broadcast_teacher(self) -> None:
        """Rank 0's teacher on every process; a sharded teacher's parameters are each
        process's own rows and stay (its buffers, whole on every process, are sent)."""
        if world_size(self.process_group) == 1:
            return
        source = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        teacher = self.mesa.teacher
        parameters = [] if is_sharded(teacher) else list(teacher.parameters())
        for tensor in [*parameters, *teacher.buffers()]:
            dist.broadcast(tensor, src=source, group=self.process_group)

    @property
    def teacher(self) -> torch.nn.Module:
        return self.mesa.teacher

    @property
    def active(self) -> bool:
        return self.mesa.active

    @property
    def memory_bytes(self) -> int:
        """Bytes of the teacher on *this* process (its shards for a sharded teacher)."""
        return self.mesa.memory_bytes

    def set_epoch(self, epoch: int) -> None:
        self.mesa.set_epoch(epoch)

    def __call__(self, inputs: Any, logits: Tensor) -> Tensor:
        """MESA's term for this process's batch (the mean KL over it; DDP averages)."""
        term = self.mesa(inputs, logits)
        reshard(self.mesa.teacher)  # a sharded teacher's forward has no backward after it
        return term

    def update(self) -> None:
        """Synchronize the student's norm statistics, then take MESA's EMA step.

        With a teacher you passed to MESA (``MESA(model, teacher=ema)``), this only
        synchronizes the statistics: call it before your own ``ema.update(model)``.
        """
        reshard(self.mesa.model)  # the EMA step reads a sharded student's shards
        sync_norm_statistics(self.mesa.model, self.statistics, self.process_group)
        if self.mesa.updates_teacher:
            self.mesa.update()

    def state_dict(self) -> dict[str, Any]:
        """MESA's state; identical on every process, so rank 0's is enough — except for a
        sharded teacher, whose ``DTensor`` shards every process saves (sharded checkpoint)."""
        return self.mesa.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mesa.load_state_dict(state)

    def __repr__(self) -> str:
        return f"DistributedMESA({self.mesa!r}, statistics={self.statistics!r})"
