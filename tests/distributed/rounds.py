"""The session's spawns: every DDP and FSDP2 scenario of this directory in one group.

Starting processes (each imports torch) dominates the cost of these tests, so the DDP
scenarios (``ddp_workers.py``) and the FSDP2 ones (``fsdp_workers.py``) share the spawns.
"""

from __future__ import annotations

from tests.distributed import ddp_workers, fsdp_workers


def first_round(rank: int, world_size: int, out_dir: str) -> None:
    """Every scenario that needs no earlier result."""
    ddp_workers.every_first_run(rank, world_size, out_dir)
    fsdp_workers.every_first_run(rank, world_size, out_dir)


def resumed_round(rank: int, world_size: int, out_dir: str) -> None:
    """Fresh processes that continue from the first round's checkpoints."""
    ddp_workers.every_resumed_run(rank, world_size, out_dir)
    fsdp_workers.every_resumed_run(rank, world_size, out_dir)
