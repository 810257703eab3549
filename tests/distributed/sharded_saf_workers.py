"""Code that runs inside the spawned processes of the sharded SAF store's tests.

As in ``fsdp_workers.py`` (which runs these in its one spawn): module-level functions
``fn(rank, world_size, out_dir)`` that write what they saw with ``torch.save``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from flatmin import SAF
from flatmin.distributed.saf import DistributedSAF
from flatmin.distributed.sharded_checkpoint import (
    save_sharded,
)
from flatmin.distributed.sharded_saf import ShardedSAF

GLOBAL_BATCH, STEPS = 16, 3
# -- the sharded SAF store ----------------------------------------------------------------

STORE_CASES = {  # name: (samples, rows per process and batch, top_k)
    "padded": (50, 4, None),
    "repeats": (10, 3, None),  # on 4 processes an epoch is padded to 12 rows: one batch
    "top_k": (50, 4, 2),  # the compressed store (issue 17), sharded the same way
}
STORE_EPOCHS, STORE_LAG, STORE_CLASSES = 6, 2, 5


def store_order(samples: int, epoch: int, rank: int, world_size: int) -> list[int]:
    sampler = DistributedSampler(range(samples), num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=5)  # fmt: skip
    sampler.set_epoch(epoch)
    return list(sampler)


def store_logits(indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """float64 logits of a batch; every 7th sample's are too large for float16 in odd epochs."""
    gen = torch.Generator().manual_seed(1000 * epoch + int(indices.sum()))
    logits = torch.randn(indices.numel(), STORE_CLASSES, generator=gen, dtype=torch.float64)
    if epoch % 2:
        logits[indices % 7 == 3, 0] = 1e6
    return logits


def caught(call, *args):
    """``call(*args)``'s result and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = call(*args)
    return result, [str(w.message) for w in seen if w.category is RuntimeWarning]


def sharded_store_run(rank: int, world_size: int, out_dir: str) -> None:
    """ShardedSAF next to the replicated DistributedSAF on the same calls: SAM's two passes
    over each batch and a read-only look-up of other rows; every result and warning, the
    terms, the stores at the end and a sharded checkpoint of the sharded one."""
    for case, (samples, batch, top_k) in STORE_CASES.items():
        settings = dict(lam=0.5, tau=2.0, lag_epochs=STORE_LAG, start_epoch=0, top_k=top_k)
        stores = {
            "sharded": ShardedSAF(samples, STORE_CLASSES, **settings),
            "replicated": DistributedSAF(SAF(samples, STORE_CLASSES, **settings)),
        }
        calls = []
        for epoch in range(STORE_EPOCHS):
            for store in stores.values():
                store.set_epoch(epoch)
            order = torch.tensor(store_order(samples, epoch, rank, world_size))
            for idx in order.split(batch):
                logits = store_logits(idx, epoch)
                for record, rows in ((True, idx), (True, idx), (False, idx.flip(0) // 2)):
                    values = store_logits(rows, epoch)
                    call = {"epoch": epoch, "indices": rows, "record": record}
                    for name, store in stores.items():
                        call[name] = caught(store.exchange, values, rows, record)
                        call[f"{name}_term"] = store(logits, idx)
                    calls.append(call)
        sharded = stores["sharded"]
        block = {k: v.to_local().clone() for k, v in sharded.state_dict()["store"].items()}
        save_sharded({"saf": sharded.state_dict()}, Path(out_dir) / f"sharded_store_{case}")
        replicated = stores["replicated"].state_dict()["store"]
        torch.save(
            {
                "calls": calls,
                "block": block,
                "bounds": (sharded.low, sharded.high),
                "replicated": {k: v.clone() for k, v in replicated.items()},
                "memory": (sharded.memory_bytes, stores["replicated"].memory_bytes),
            },
            Path(out_dir) / f"sharded_store_{case}_{rank}.pt",
        )
