"""Sharded checkpoints of FSDP2 runs with ``torch.distributed.checkpoint`` (DCP).

Under FSDP2 no rank holds the whole state: the weights, the base optimizer's moments,
LookSAM's ``g_v``, MESA's teacher and a sharded SAF store are ``DTensor`` shards. DCP
writes every rank's shards into one directory (``.metadata`` plus a file per rank) and
loads them *in place* into a state dict of the same layout — at the same or another
number of processes. A plain tensor under one key is taken as replicated and written
once; values that differ between ranks go under per-rank keys (:func:`per_rank`).

What this module adds to DCP:

* :func:`sharded_state_dict` / :func:`load_sharded_state_dict` — the model's and the
  SAM-family optimizer's state dicts keyed by parameter names (torch's
  ``get_*_state_dict``/``set_*_state_dict``). DCP's helpers initialise a fresh
  optimizer's state by calling ``optimizer.step()`` with zero gradients and no closure,
  which a two-pass optimizer refuses; :func:`optimizer_state_initialized` steps the base
  optimizer instead (learning rate 0, so nothing moves).
* :func:`save_sharded` / :func:`load_sharded` — ``dcp.save``/``dcp.load`` of a whole
  state dict (the two above, the method's terms, RNG states, counters).

Example (every rank runs it), for an FSDP2 ``model``, its SAM-family ``optimizer`` and
a SAF ``saf``:

.. test: setup=fsdp_sam processes=2

::

    import torch.distributed as dist

    epoch = 3
    state = {
        "train": sharded_state_dict(model, optimizer),
        "saf": saf.state_dict(),
        "rng": per_rank(torch.get_rng_state()),
        "epoch": epoch,
    }
    save_sharded(state, "run/checkpoint")
    ...                                   # later, in new processes: the same layout
    state = {"train": sharded_state_dict(model, optimizer), "saf": saf.state_dict(),
             "rng": per_rank(torch.get_rng_state()), "epoch": 0}
    load_sharded(state, "run/checkpoint")   # fills the tensors in place
    load_sharded_state_dict(model, optimizer, state["train"])
    saf.load_state_dict(state["saf"])
    torch.set_rng_state(state["rng"][f"rank{dist.get_rank()}"])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer


@contextmanager
def optimizer_state_initialized(optimizer: Optimizer, *, keep: bool = True) -> Iterator[None]:
    """Give a SAM-family ``optimizer`` the state layout its base optimizer will have
    (Adam's moments, SGD's momentum) without moving any weight, for DCP's helpers.

    If no parameter has a gradient: every parameter gets a zero gradient for the block
    (so DCP's own initialisation, which would call ``optimizer.step()`` without a
    closure, sees gradients and does nothing) and, if the state is empty, the *base*
    optimizer steps once with learning rate 0 — as DCP itself does for plain optimizers
    (Adam's step count becomes 1). The gradients are ``None`` again afterwards; with
    ``keep=False`` a state created here is dropped again too (saving must not change the
    optimizer). Existing gradients are left as they are.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(p.grad is not None for p in params):
        yield
        return
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    created = not optimizer.state
    try:
        if created:
            base = getattr(optimizer, "base_optimizer", optimizer)
            rates = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            try:
                base.step()
            finally:
                for group, rate in zip(optimizer.param_groups, rates):
                    group["lr"] = rate
        yield
    finally:
        for p in params:
            p.grad = None
        if created and not keep:
            optimizer.state.clear()


def sharded_state_dict(model: nn.Module, optimizer: Optimizer | None = None) -> dict[str, Any]:
    """``{"model": …, "optimizer": …}`` keyed by parameter names, for :func:`save_sharded`
    and as the template of :func:`load_sharded` (``optimizer`` may be omitted). The
    optimizer is not changed; one that has not stepped yet gives the state of a step
    with learning rate 0 (:func:`optimizer_state_initialized`)."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        with optimizer_state_initialized(optimizer, keep=False):
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def load_sharded_state_dict(
    model: nn.Module, optimizer: Optimizer | None, state: dict[str, Any]
) -> None:
    """Load what :func:`sharded_state_dict` gave (after :func:`load_sharded` filled it)."""
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        with optimizer_state_initialized(optimizer):
            set_optimizer_state_dict(model, optimizer, state["optimizer"])


def per_rank(value: Any) -> dict[str, Any]:
    """``{"rank<r>": value}`` for this process's rank ``r``: state that differs between
    ranks (RNG states) under a key of its own, which DCP saves for every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return {f"rank{rank}": value}


def save_sharded(state: dict[str, Any], directory: str | Path) -> None:
    """Write ``state`` (tensors, DTensors and picklable values) with DCP into
    ``directory``, every rank its shards; a collective."""
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(state: dict[str, Any], directory: str | Path) -> None:
    """Fill ``state`` in place from a checkpoint written by :func:`save_sharded`: every
    key of ``state`` must be in the checkpoint; its tensors receive the saved values of
    their shards, other values are replaced. A collective."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(
            f"expected a torch.distributed.checkpoint directory at {directory} (with a "
            ".metadata file), written by save_sharded"
        )
    dcp.load(state, checkpoint_id=str(directory))
