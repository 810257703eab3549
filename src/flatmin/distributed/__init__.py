"""Multi-process training on ``torch.distributed`` that keeps each method's meaning.

* :mod:`~flatmin.distributed.sam` — the SAM family under DDP with per-process ε (the
  SAM paper's m-sharpness) or, as an option, the globally averaged gradient.
* :mod:`~flatmin.distributed.m_sharpness` — the same m-sharpness step on one process.
* :mod:`~flatmin.distributed.saf` — SAF with a store replicated on every process.
* :mod:`~flatmin.distributed.mesa` — MESA with a teacher identical on every process.
* :mod:`~flatmin.distributed.collectives` — gradient and statistics averaging, metric
  reduction, replica checks; :mod:`~flatmin.distributed.checkpoint` — rank-0 checkpoints.
* :mod:`~flatmin.distributed.launch` — N local gloo processes (the reference trainer on
  N processes, ``flatmin train --nproc N``, is :mod:`flatmin.train.ddp`).

Past one machine's memory, with FSDP2 (``torch.distributed.fsdp.fully_shard``):

* :func:`sam_step` with ``perturbation="global"`` steps every SAM-family member on the
  shards (:mod:`~flatmin.distributed.fsdp`: helpers for sharded models);
* :mod:`~flatmin.distributed.sharded_saf` — :class:`~flatmin.distributed.ShardedSAF`,
  SAF's store split across the processes (each holds ``1/W`` of it);
* :mod:`~flatmin.distributed.sharded_checkpoint` — sharded checkpoints with
  ``torch.distributed.checkpoint``.

These two modules import ``torch.distributed.tensor`` (about a second), so they are
loaded on first use of their names here.

A loop of your own, on each process (``torchrun --nproc-per-node N script.py``), given a
``model`` and a ``loader`` over a ``DistributedSampler``:

.. test: setup=ddp processes=2

::

    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from flatmin import SAM
    from flatmin.distributed import init_from_env, reduce_metrics, sam_step

    init_from_env()
    ddp = DistributedDataParallel(model)
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in loader:                                  # a DistributedSampler's shard
        def closure():
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss
        loss = sam_step(opt, ddp, closure)               # per-process ε, averaged g_s
        metrics = reduce_metrics({"loss": loss})         # the same numbers on every rank
"""

import importlib
from typing import Any

from flatmin.distributed.checkpoint import load_on_every_rank, save_on_rank0
from flatmin.distributed.collectives import (
    average_gradients,
    max_replica_difference,
    reduce_metrics,
    sync_norm_statistics,
)
from flatmin.distributed.launch import init_from_env, leave_group, spawn
from flatmin.distributed.m_sharpness import m_sharpness_step
from flatmin.distributed.mesa import DistributedMESA
from flatmin.distributed.saf import DistributedSAF
from flatmin.distributed.sam import first_pass, sam_step

_LAZY = {
    "ShardedSAF": "flatmin.distributed.sharded_saf",
    "load_sharded": "flatmin.distributed.sharded_checkpoint",
    "load_sharded_state_dict": "flatmin.distributed.sharded_checkpoint",
    "per_rank": "flatmin.distributed.sharded_checkpoint",
    "save_sharded": "flatmin.distributed.sharded_checkpoint",
    "sharded_state_dict": "flatmin.distributed.sharded_checkpoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flatmin.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    *_LAZY,
    "DistributedMESA",
    "DistributedSAF",
    "average_gradients",
    "first_pass",
    "init_from_env",
    "leave_group",
    "load_on_every_rank",
    "m_sharpness_step",
    "max_replica_difference",
    "reduce_metrics",
    "sam_step",
    "save_on_rank0",
    "spawn",
    "sync_norm_statistics",
]
