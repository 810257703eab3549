r"""SAF on several processes: one store, replicated, that every process keeps current.

SAF (Du et al., NeurIPS 2022) compares sample ``i``'s logits with those the training
pass produced for ``i`` ``Ẽ`` epochs earlier. Under ``DistributedSampler`` the samples
are reshuffled *across processes* every epoch, so sample ``i`` is seen by one process in
epoch ``e − Ẽ`` and usually by another in epoch ``e``. The official multi-GPU code keeps
one store per process: most look-ups then hit a slot that process never wrote, and the
target is stale or empty (all zeros, i.e. a uniform distribution).

**Layout: replicated store.** Every step each process all-gathers the batch's
``(logits, indices)`` of all processes and records the whole global batch into its own
full copy of the store, so all copies stay identical and any process finds any sample's
past logits locally. Per step and process this costs three small all-gathers (batch
sizes and epochs, indices, and the rows in the store's format — the logits in the store's
dtype: ``W·B·(C·itemsize + 8)`` bytes received; with ``SAF(top_k=k)`` the compressed rows,
``W·B·(row_bytes + 8)``, encoded by each process before the gather); memory per process is
the whole store, ``N·C·Ẽ·itemsize + N·Ẽ·4`` bytes (CIFAR-10, Ẽ = 3, float16: 3.6 MB;
ImageNet-1k, Ẽ = 3, float16: 7,346 MiB on each process — keep it on the CPU, memory-map
it or compress it with ``top_k``, see :class:`flatmin.SAF`). A rank-0 checkpoint holds
the whole state.

**The alternative: sharded store.** Process ``r`` owns the samples with
``i mod W = r`` (memory ÷ W); every step each process sends the indices it needs to their
owners and receives targets back (an all-to-all of requests and one of replies) and
sends its new logits to the owners (a third). It needs less memory but three
latency-bound exchanges per step and a checkpoint gathered from all ranks; choose it
only when the replicated store does not fit in host memory or a memory map.

**The term.** Process ``r`` adds ``λ·τ²·Σ_{i∈V_r} KL_i · W/|V|``, where ``V_r`` are its
valid rows and ``V`` those of the global batch; DDP's gradient average over ``W``
processes then gives exactly the single-process gradient of ``λ·τ²·mean_{i∈V} KL_i`` on
the global batch (the plain per-process mean would weigh processes with few valid rows
too much). Validity is decided on the global batch, so a sample that the sampler pads
onto two processes counts once, at its first occurrence in rank order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flatmin.distributed.collectives import ProcessGroup, world_size
from flatmin.trajectory.kl import zero_term
from flatmin.trajectory.logit_store import Rows
from flatmin.trajectory.saf import SAF


class DistributedSAF:
    """Wrap a :class:`flatmin.SAF` so its store is shared by all processes of a group.

    Use it exactly like SAF, on every process, with this process's batch:

    .. test: setup=ddp_model processes=2 check="saf.active"

    ::

        from torch.utils.data import DataLoader, DistributedSampler
        from flatmin.data import WithIndex

        saf = DistributedSAF(SAF(num_samples=len(train_set), num_classes=10))
        sampler = DistributedSampler(WithIndex(train_set), shuffle=True)
        loader = DataLoader(WithIndex(train_set), batch_size=8, sampler=sampler)
        opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            saf.set_epoch(epoch)
            for x, y, idx in loader:
                logits = ddp_model(x)
                loss = F.cross_entropy(logits, y) + saf(logits, idx)
                opt.zero_grad(); loss.backward(); opt.step()

    Every call is a collective: all processes must call it the same number of times. The
    wrapper only gathers: the look-up, the record, the reuse of the targets on another
    pass over the same batch (SAM's second pass) and the warnings are the wrapped SAF's,
    applied to the global batch.
    """

    def __init__(self, saf: SAF, process_group: ProcessGroup = None) -> None:
        if not isinstance(saf, SAF):
            raise TypeError(f"expected a flatmin.SAF to wrap, got {type(saf).__name__}")
        self.saf = saf
        self.process_group = process_group

    # -- SAF's surface ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.saf.epoch

    @property
    def active(self) -> bool:
        return self.saf.active

    @property
    def memory_bytes(self) -> int:
        """Bytes of the store on *each* process (the full store is replicated)."""
        return self.saf.memory_bytes

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch (call on every process at every epoch start)."""
        self.saf.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped SAF's state; identical on every process, so rank 0's is enough."""
        return self.saf.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saf.load_state_dict(state)

    # -- the exchange -------------------------------------------------------------------

    def exchange(
        self, logits: Tensor, indices: Tensor, record: bool = True
    ) -> tuple[Rows, Tensor, Tensor]:
        """All-gather the batch, look it up (and record it) in SAF; return this rank's part.

        Returns ``(targets, valid, global_valid_count)``: the stored rows for this
        process's batch (the store's row format, see :meth:`flatmin.SAF.lookup`), their
        ``(B,)`` validity and the number of valid rows in the whole global batch (a 0-dim
        tensor), all on ``logits``' device (where the batch was gathered).
        """
        saf, group = self.saf, self.process_group
        saf.store.check_batch(logits, indices)
        sizes = _gather_batch_sizes(indices.shape[0], saf.epoch, group)
        all_indices = _all_gather_rows(indices.to(torch.long), sizes, group)
        found = saf.previous_lookup(all_indices)
        if found is None:  # a new batch: its rows are needed, encoded by each process
            rows = saf.store.encode(logits, saf.tau)
            all_rows = tuple(_all_gather_rows(part, sizes, group) for part in rows)
            found = saf.lookup_rows(all_rows, all_indices, record)
        targets, valid = found
        rank = dist.get_rank(group) if len(sizes) > 1 else 0
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        return tuple(part[mine] for part in targets), valid[mine], valid.sum()

    def __call__(self, logits: Tensor, indices: Tensor, record: bool = True) -> Tensor:
        """This process's share of ``λ·τ²·mean KL(past ‖ present)`` over the global batch.

        Summed over processes (as DDP's gradient average does, times ``W``) it equals
        :class:`flatmin.SAF`'s term on the global batch; see the module docstring.
        """
        targets, valid, global_count = self.exchange(logits, indices, record)
        saf = self.saf
        if not saf.active or saf.lam == 0:
            return zero_term(logits)
        local_mean = saf.store.kl(logits, targets, saf.tau, valid)
        # The share in the term's dtype: int64 / int64 would give float32.
        dtype = local_mean.dtype
        share = valid.sum().to(dtype) * world_size(self.process_group)
        return saf.lam * local_mean * share / global_count.to(dtype).clamp(min=1)

    def __repr__(self) -> str:
        return f"DistributedSAF({self.saf!r}, world_size={world_size(self.process_group)})"


def _gather_batch_sizes(batch: int, epoch: int, group: ProcessGroup) -> list[int]:
    """Every rank's batch size (one small all-gather); the ranks must agree on the epoch."""
    size = world_size(group)
    if size == 1:
        return [batch]
    mine = torch.tensor([batch, epoch], dtype=torch.long)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    epochs = sorted({e for _, e in table})
    if len(epochs) > 1:
        raise ValueError(
            f"DistributedSAF: the processes are at different epochs {epochs}; call "
            "set_epoch(epoch) with the same epoch on every process"
        )
    return [b for b, _ in table]


def _all_gather_rows(rows: Tensor, sizes: list[int], group: ProcessGroup) -> Tensor:
    """Concatenate every rank's ``rows`` in rank order (padded to the longest batch)."""
    if len(sizes) == 1:
        return rows
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
