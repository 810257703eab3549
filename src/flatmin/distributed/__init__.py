"""Multi-process training on ``torch.distributed`` that keeps each method's meaning.

* :mod:`~flatmin.distributed.sam` — the SAM family under DDP with per-process ε (the
  SAM paper's m-sharpness) or, as an option, the globally averaged gradient.
* :mod:`~flatmin.distributed.m_sharpness` — the same m-sharpness step on one process.
* :mod:`~flatmin.distributed.saf` — SAF with a store replicated on every process.
* :mod:`~flatmin.distributed.collectives` — gradient and statistics averaging, metric
  reduction, replica checks; :mod:`~flatmin.distributed.checkpoint` — rank-0 checkpoints.
* :mod:`~flatmin.distributed.launch` — N local gloo processes (tests, ``--nproc``).
"""

from flatmin.distributed.collectives import (
    average_gradients,
    max_replica_difference,
    reduce_metrics,
    sync_norm_statistics,
)
from flatmin.distributed.m_sharpness import m_sharpness_step
from flatmin.distributed.sam import first_pass, first_pass_local, sam_step, unwrap

__all__ = [
    "average_gradients",
    "first_pass",
    "first_pass_local",
    "m_sharpness_step",
    "max_replica_difference",
    "reduce_metrics",
    "sam_step",
    "sync_norm_statistics",
    "unwrap",
]
