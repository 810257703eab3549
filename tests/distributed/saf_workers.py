"""Code that runs inside the spawned processes of the distributed SAF tests.

As in ``ddp_workers.py`` (which runs these in its one spawn): module-level functions
``fn(rank, world_size, out_dir, ...)`` that write what they saw with ``torch.save``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from flatmin import SAF
from flatmin.distributed import reduce_metrics
from flatmin.distributed.saf import DistributedSAF

# -- look-ups, training and warnings of the replicated store ---------------------------------------------------------------------------------

SAF_SAMPLES, SAF_CLASSES, SAF_LAG, SAF_EPOCHS, SAF_RANK_BATCH = 20, 3, 2, 5, 2


def synthetic_logits(indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """Logits that name the sample and the epoch (small integers: exact in float16)."""
    i = indices.to(torch.float32)
    return torch.stack([i, torch.full_like(i, float(epoch)), (i * (epoch + 1)) % 7], dim=1)


def rank_order(num_samples: int, epoch: int, rank: int, world_size: int) -> list[int]:
    sampler = DistributedSampler(
        range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=0
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def saf_lookup_run(rank: int, world_size: int, out_dir: str) -> None:
    """Record every look-up of a shared store and of a per-process store (official layout)."""
    shared = DistributedSAF(SAF(SAF_SAMPLES, SAF_CLASSES, lag_epochs=SAF_LAG, start_epoch=0))
    per_process = SAF(SAF_SAMPLES, SAF_CLASSES, lag_epochs=SAF_LAG, start_epoch=0)
    lookups = []
    for epoch in range(SAF_EPOCHS):
        shared.set_epoch(epoch)
        per_process.set_epoch(epoch)
        order = torch.tensor(rank_order(SAF_SAMPLES, epoch, rank, world_size))
        for idx in order.split(SAF_RANK_BATCH):
            logits = synthetic_logits(idx, epoch)
            targets, valid, count = shared.exchange(logits, idx)
            own = per_process.store.exchange(logits, idx, epoch)
            lookups.append((epoch, idx, targets, valid, count, own.valid))
    # Batches of different sizes on the two ranks (the gather pads and trims).
    shared.set_epoch(SAF_EPOCHS)
    uneven = torch.arange(3) if rank == 0 else torch.arange(3, 5)
    uneven_result = shared.exchange(synthetic_logits(uneven, SAF_EPOCHS), uneven)
    # Processes at different epochs: refused on every process, before anything is written.
    shared.set_epoch(SAF_EPOCHS + rank + 1)
    written = shared.state_dict()["store"]["written_epoch"].clone()
    try:
        shared.exchange(synthetic_logits(uneven, 0), uneven)
        epoch_error = None
    except ValueError as error:
        epoch_error = str(error)
    unchanged = torch.equal(written, shared.state_dict()["store"]["written_epoch"])
    torch.save(
        {
            "lookups": lookups,
            "store": shared.state_dict(),
            "uneven": uneven_result,
            "epoch_error": (epoch_error, unchanged),
        },
        Path(out_dir) / f"saf_lookup_{rank}.pt",
    )


SAF_TRAIN_SAMPLES, SAF_TRAIN_EPOCHS = 16, 4


def saf_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(SAF_TRAIN_SAMPLES, 4, generator=gen), torch.randint(
        0, 3, (SAF_TRAIN_SAMPLES,), generator=gen
    )


def saf_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def saf_train_run(rank: int, world_size: int, out_dir: str, top_k: int | None = None) -> None:
    """SGD + SAF (full rows, or ``top_k``) on DDP; each rank sees its DistributedSampler
    shard."""
    model = saf_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    saf = DistributedSAF(
        SAF(SAF_TRAIN_SAMPLES, 3, lam=1.0, tau=2.0, lag_epochs=1, start_epoch=0, top_k=top_k)
    )
    xs, ys = saf_data()
    terms = []
    for epoch in range(SAF_TRAIN_EPOCHS):
        saf.set_epoch(epoch)
        order = torch.tensor(rank_order(SAF_TRAIN_SAMPLES, epoch, rank, world_size))
        for idx in order.split(SAF_RANK_BATCH):
            logits = ddp(xs[idx])
            term = saf(logits, idx)
            loss = F.cross_entropy(logits, ys[idx]) + term
            opt.zero_grad()
            loss.backward()
            opt.step()
            terms.append(reduce_metrics({"term": term})["term"])
    name = "saf_train" if top_k is None else f"saf_train_top{top_k}"
    torch.save(
        {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "terms": terms,
            "store": {k: v.clone() for k, v in saf.state_dict()["store"].items()},
        },
        Path(out_dir) / f"{name}_{rank}.pt",
    )


SAF_PADDED_SAMPLES = 7  # DistributedSampler pads an epoch of 2 processes to 8 rows


def saf_warning_run(rank: int, world_size: int, out_dir: str) -> None:
    """The warnings each process sees: none for padded epochs with ``set_epoch``; a skipped
    non-finite row of rank 1 on both processes; a forgotten ``set_epoch`` once."""
    saf = DistributedSAF(SAF(SAF_PADDED_SAMPLES, 3, lag_epochs=1, start_epoch=0))
    caught = {}

    def epochs(name: str, first: int, count: int, set_epoch: bool, poison: bool = False):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for epoch in range(first, first + count):
                if set_epoch:
                    saf.set_epoch(epoch)
                order = torch.tensor(rank_order(SAF_PADDED_SAMPLES, epoch, rank, world_size))
                for idx in order.split(2):
                    logits = synthetic_logits(idx, epoch)
                    if poison and rank == 1:
                        logits[0, 0] = float("nan")
                        poison = False
                    saf(logits, idx)
        caught[name] = [str(w.message) for w in seen]

    epochs("with_set_epoch", 0, 3, set_epoch=True)
    epochs("non_finite", 3, 1, set_epoch=True, poison=True)
    epochs("forgotten", 4, 3, set_epoch=False)
    torch.save(caught, Path(out_dir) / f"saf_warnings_{rank}.pt")


def all_saf_runs(rank: int, world_size: int, out_dir: str) -> None:
    saf_lookup_run(rank, world_size, out_dir)
    saf_train_run(rank, world_size, out_dir)
    saf_train_run(rank, world_size, out_dir, top_k=1)
    saf_warning_run(rank, world_size, out_dir)
