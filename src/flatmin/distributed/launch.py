"""Start N local processes that form a ``torch.distributed`` group (gloo, CPU).

Used by the tests and by ``flatmin train --nproc N``. Each child gets the environment
that ``torchrun`` would give it (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), joins the process group, runs ``fn(rank, world_size,
*args)`` and leaves the group. Under ``torchrun`` use :func:`init_from_env` instead::

    torchrun --nproc-per-node 2 my_script.py      # my_script calls init_from_env()
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str = "gloo",
    timeout: timedelta = timedelta(seconds=120),
    threads_per_process: int = 1,
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes that form a group.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level), as the
    processes are started with the ``spawn`` method. Blocks until every process has
    finished; an exception in any of them is raised here (``ProcessRaisedException``).
    Results travel through files, e.g. ``torch.save`` in ``fn``.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"expected nprocs to be a positive int, got {nprocs!r}")
    if not callable(fn):
        raise TypeError(f"expected a callable fn(rank, world_size, *args), got {fn!r}")
    port = free_port()
    mp.start_processes(
        _run_in_group,
        args=(fn, nprocs, port, backend, timeout, threads_per_process, args),
        nprocs=nprocs,
        join=True,
        start_method="spawn",
    )


def _run_in_group(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    timeout: timedelta,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR=LOCALHOST,
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def init_from_env(backend: str = "gloo") -> tuple[int, int]:
    """Join the group described by torchrun's environment; returns ``(rank, world_size)``.

    A no-op returning ``(0, 1)`` when ``WORLD_SIZE`` is unset (a plain single process).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
