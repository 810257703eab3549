"""Checkpoints in a process group: rank 0 writes, every rank reads the same file.

Replicated state (DDP weights, the optimizer state, a replicated SAF store, MESA's
teacher, synchronized BatchNorm statistics) is identical on every rank, so one copy is
the whole state: rank 0 writes it atomically and the others wait at a barrier, and on
resume every rank loads that file and continues bit for bit as if never stopped (the
distributed sampler's order depends only on its seed and epoch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flatmin.distributed.collectives import ProcessGroup, max_replica_difference


def save_on_rank0(
    state: dict[str, Any],
    path: str | Path,
    group: ProcessGroup = None,
    replicated: list[Tensor] | None = None,
) -> None:
    """Write ``state`` from rank 0 (atomically: a temporary file, then a rename); all wait.

    Pass the tensors that must be identical on every rank as ``replicated`` (e.g.
    ``list(model.parameters())``) to check them first: a ``RuntimeError`` is raised on
    every rank, and nothing is written, if any rank differs from rank 0.

    Example, on every process of the group (read back with :func:`load_on_every_rank`):

    .. test: setup=ddp_model processes=2

    ::

        state = {"model": ddp_model.module.state_dict(), "optimizer": opt.state_dict()}
        save_on_rank0(state, "checkpoint.pt", replicated=list(ddp_model.parameters()))
    """
    path = Path(path)
    if replicated is not None:
        difference = max_replica_difference(replicated, group)
        if difference != 0.0:
            raise RuntimeError(
                f"refusing to checkpoint: replicated tensors differ between ranks by up to "
                f"{difference:g}, so rank 0's copy is not the state of every rank"
            )
    is_writer = not dist.is_initialized() or dist.get_rank(group) == 0
    if is_writer:
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, path)
    if dist.is_initialized():
        dist.barrier(group)


def load_on_every_rank(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_on_rank0` (call on every rank).

    Example, resuming on every process:

    .. test: setup=ddp_model processes=2

    ::

        save_on_rank0({"model": ddp_model.module.state_dict()}, "resume.pt")
        state = load_on_every_rank("resume.pt")
        ddp_model.module.load_state_dict(state["model"])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint file at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)
