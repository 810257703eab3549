"""Start N local processes that form a ``torch.distributed`` group (gloo, CPU).

Used by the tests and by ``flatmin train --nproc N``. Each child gets the environment
that ``torchrun`` would give it (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), joins the process group, runs ``fn(rank, world_size,
*args)``, waits at a barrier for the others and leaves the group. A child whose parent
dies (even by SIGKILL, which the parent cannot pass on) is killed too. Under
``torchrun`` use :func:`~flatmin.distributed.init_from_env` instead:

.. code-block:: bash

    torchrun --nproc-per-node 2 my_script.py      # my_script calls init_from_env()

See :func:`~flatmin.distributed.spawn` for an example.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
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
    finished. An exception in a process is raised here as itself when it can be pickled
    (e.g. a ``ValueError`` with its message), chained to torch's
    ``ProcessRaisedException`` that holds the process's traceback; otherwise that
    ``ProcessRaisedException``. Results travel through files, e.g. ``torch.save`` in ``fn``.

    Example, a script (the processes import ``fn`` from it, hence the ``__main__`` guard):

    .. test: script

    ::

        import torch
        from flatmin.distributed import reduce_metrics, spawn

        def work(rank, world_size, out):               # at module level: it is pickled
            torch.save(reduce_metrics({"rank": rank}), f"{out}/rank{rank}.pt")

        if __name__ == "__main__":
            spawn(work, 2, ".")
            print(torch.load("rank1.pt"))              # {'rank': 0.5} from both files
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"expected nprocs to be a positive int, got {nprocs!r}")
    if not callable(fn):
        raise TypeError(f"expected a callable fn(rank, world_size, *args), got {fn!r}")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="flatmin-spawn-") as errors, _quiet_clean_up():
        try:
            mp.start_processes(
                _run_in_group,
                args=(fn, nprocs, port, backend, timeout, threads_per_process, args,
                      errors, os.getpid()),
                nprocs=nprocs,
                join=True,
                start_method="spawn",
            )  # fmt: skip
        except mp.ProcessRaisedException as failure:
            original = _first_error(Path(errors))
            if original is None:
                raise
            raise original from failure


class _DropTermination(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Terminating process")


@contextlib.contextmanager
def _quiet_clean_up():
    """Hide torch's "Terminating process N via signal SIGTERM" while it stops the other
    processes after one failed: the failure itself is raised as one error."""
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    drop = _DropTermination()
    spawn_log.addFilter(drop)
    try:
        yield
    finally:
        spawn_log.removeFilter(drop)


def _run_in_group(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    timeout: timedelta,
    threads: int,
    args: tuple[Any, ...],
    errors: str,
    parent: int,
) -> None:
    _die_with_parent(parent)
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
    except BaseException as error:
        _write_error(Path(errors) / str(rank), error)  # before the group goes down
        dist.destroy_process_group()
        raise
    leave_group()


def _write_error(path: Path, error: BaseException) -> None:
    """Keep ``error`` for the parent, if it survives a pickle round trip."""
    try:
        data = pickle.dumps(error.with_traceback(None))
        pickle.loads(data)
    except Exception:
        return
    path.write_bytes(data)


def _first_error(errors: Path) -> BaseException | None:
    """The exception that was kept first: the cause, when a process's failure made the
    others fail too (their collectives lose their peer)."""
    for path in sorted(errors.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        try:
            error = pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError):
            continue
        if isinstance(error, BaseException):
            return error
    return None


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Have this process killed when ``parent`` dies: the kernel's parent-death signal
    on Linux (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), a thread that polls the parent's
    pid elsewhere. A parent that died before this call is noticed at once."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int, interval: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def leave_group() -> None:
    """Leave the process group once this process's work is done (call on every process:
    a collective), e.g. at the end of a script under ``torchrun``.

    FSDP2 modules sit in reference cycles that hold gloo work objects; freed only at
    interpreter exit, after the group is gone, they abort the process ("terminate called
    without an active exception") once in a few dozen runs, so they are collected first.
    The barrier keeps a process that finished first from tearing its connections down
    while the others still use them (gloo aborts the same way).
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def init_from_env(backend: str = "gloo") -> tuple[int, int]:
    """Join the group described by torchrun's environment; returns ``(rank, world_size)``.

    A no-op returning ``(0, 1)`` when ``WORLD_SIZE`` is unset (a plain single process),
    and the current ``(rank, world_size)`` when the group is already initialized.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
