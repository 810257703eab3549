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
   statistics into per-process teachers. :meth:`DistributedMESA.update` first makes the
   student's statistics identical (``statistics="broadcast"``: rank 0's, which is what
   DDP would do a moment later anyway; ``"mean"``: their average), then takes the step
   (for a teacher MESA built; the owner of a teacher passed to MESA updates it after).

Cost: one broadcast of the norm statistics per step (negligible next to DDP's own).
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
from flatmin.optim._checks import check_choice
from flatmin.trajectory.mesa import MESA


class DistributedMESA:
    """Wrap a :class:`flatmin.MESA` built on the *unwrapped* model (``ddp_model.module``).

    Use it like MESA on every process; :meth:`update` is a collective::

        mesa = DistributedMESA(MESA(ddp_model.module))
        ...
        loss = F.cross_entropy(logits, y) + mesa(x, logits)
        loss.backward(); opt.step(); mesa.update()
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
        if world_size(self.process_group) == 1:
            return
        source = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        for tensor in [*self.mesa.teacher.parameters(), *self.mesa.teacher.buffers()]:
            dist.broadcast(tensor, src=source, group=self.process_group)

    @property
    def teacher(self) -> torch.nn.Module:
        return self.mesa.teacher

    @property
    def active(self) -> bool:
        return self.mesa.active

    @property
    def memory_bytes(self) -> int:
        """Bytes of the teacher on *each* process."""
        return self.mesa.memory_bytes

    def set_epoch(self, epoch: int) -> None:
        self.mesa.set_epoch(epoch)

    def __call__(self, inputs: Any, logits: Tensor) -> Tensor:
        """MESA's term for this process's batch (the mean KL over it; DDP averages)."""
        return self.mesa(inputs, logits)

    def update(self) -> None:
        """Synchronize the student's norm statistics, then take MESA's EMA step.

        With a teacher you passed to MESA (``MESA(model, teacher=ema)``), this only
        synchronizes the statistics: call it before your own ``ema.update(model)``.
        """
        sync_norm_statistics(self.mesa.model, self.statistics, self.process_group)
        if self.mesa.updates_teacher:
            self.mesa.update()

    def state_dict(self) -> dict[str, Any]:
        """MESA's state; identical on every process, so rank 0's is enough."""
        return self.mesa.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mesa.load_state_dict(state)

    def __repr__(self) -> str:
        return f"DistributedMESA({self.mesa!r}, statistics={self.statistics!r})"
