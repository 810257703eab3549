r"""SAF with its store sharded across processes: each holds the rows of ``N/W`` samples.

SAF (Du et al., NeurIPS 2022) keeps ``Ẽ`` past logit rows per training sample. The
replicated store (:class:`~flatmin.distributed.saf.DistributedSAF`) keeps the whole
``N·C·Ẽ`` table on every process, which stops scaling long before ImageNet-21k
(14 M samples × 21,841 classes). Here process ``r`` *owns* one contiguous block of samples,
``[r·⌈N/W⌉, min((r+1)·⌈N/W⌉, N))`` — the layout of a tensor sharded on its sample
dimension (``torch.chunk``, ``DTensor`` ``Shard``) — and keeps only their rows, so its
memory is ``1/W`` of the store:

.. math::

    \text{bytes per process} = ⌈N/W⌉·(C·\text{itemsize} + 4)·Ẽ

**One call, on every process** (a reshuffling ``DistributedSampler`` sends sample ``i``
to any process in any epoch):

1. an all-gather of a ``W + 3`` integer header: the rows this process sends to each
   owner, its epoch, its record flag and whether its batch repeats its previous
   recording call's — so every process knows every split size, the epochs and flags are
   checked to agree, and a repeated pass (SAM's second pass) is agreed on together;
2. an ``all_to_all`` of the requests, ordered by owner (a stable sort): each row's index
   and, when recording, its encoded row (SAF's row tuple, packed into bytes);
3. each owner reads and records what it received in its block's store. The rows arrive
   in global (rank, position) order and every occurrence of a sample reaches the same
   owner, so reading before overwriting, validity by the epoch that wrote a slot, the
   first-occurrence rule within the global batch and skipping non-finite rows are
   exactly those of one store holding everything;
4. an ``all_to_all`` of the replies: each row's validity and the row read;
5. an all-reduce of two numbers: the global batch's valid rows (for the term) and rows
   that are not finite in the store's dtype (for SAF's warning).

So the targets, their validity and the term are those of the replicated store, while
each process sends and receives about ``B·(row bytes + 9)`` bytes per call whatever
``W`` is (the replicated store receives ``W·B·(row bytes + 8)``). A repeated pass costs
the header only. Rows travel in the store's own format — a tuple of tensors with leading
dimension ``B`` (``Rows``: the logits in the store
dtype, or with ``top_k`` the compressed rows of
:class:`~flatmin.trajectory.topk_store.TopKLogitStore`), packed into one byte row per
sample — so both stores are sharded the same way.

**The term** is :class:`~flatmin.distributed.saf.DistributedSAF`'s: process ``r`` adds
``λ·τ²·Σ_{i∈V_r} KL_i · W/|V|``, which the data-parallel gradient average turns into the
single-process term on the global batch.

**Checkpoints.** ``ShardedSAF.state_dict()`` gives the blocks as ``DTensor`` shards of
the global ``(Ẽ, N, C)`` table (with ``torch.distributed.checkpoint``, every process
writes its block; a checkpoint loads at another number of processes too), or plain
tensors on a single process.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from flatmin.distributed.collectives import ProcessGroup, world_size
from flatmin.optim._checks import check_int
from flatmin.trajectory.kl import zero_term
from flatmin.trajectory.logit_store import LogitStore, Rows
from flatmin.trajectory.saf import SAF


def block_of(rank: int, num_samples: int, processes: int) -> tuple[int, int]:
    """The samples ``[low, high)`` that ``rank`` owns: ``⌈N/W⌉`` per process in rank
    order, the last processes fewer or none (``torch.chunk``'s split)."""
    chunk = math.ceil(num_samples / processes)
    low = min(rank * chunk, num_samples)
    return low, min(low + chunk, num_samples)


class ShardedSAF:
    """SAF whose store is split across the processes of a group (see the module docstring).

    Takes :class:`flatmin.SAF`'s arguments and behaves like
    :class:`~flatmin.distributed.saf.DistributedSAF` (``set_epoch``, ``__call__``,
    ``exchange``, ``state_dict``, ``memory_bytes``), on every process with this
    process's batch; every call is a collective. ``memmap_path`` gets the suffix
    ``.rank<r>``: each process maps its own block; ``top_k`` shards the compressed store.
    Example, on every process:

    .. test: setup=ddp_model processes=2 check="saf.active"

    ::

        from torch.utils.data import DataLoader, DistributedSampler
        from flatmin.data import WithIndex

        sampler = DistributedSampler(WithIndex(train_set))
        loader = DataLoader(WithIndex(train_set), batch_size=8, sampler=sampler)
        saf = ShardedSAF(num_samples=len(train_set), num_classes=10, lag_epochs=2)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            saf.set_epoch(epoch)
            for x, y, idx in loader:
                logits = model(x)
                loss = F.cross_entropy(logits, y) + saf(logits, idx)
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        lam: float = 0.3,
        tau: float = 5.0,
        lag_epochs: int = 3,
        start_epoch: int = 5,
        store_dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        memmap_path: str | Path | None = None,
        *,
        top_k: int | None = None,
        process_group: ProcessGroup = None,
    ) -> None:
        num_samples = check_int("num_samples", num_samples, minimum=1)
        self.process_group = process_group
        self.processes = world_size(process_group)
        self.rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self.num_samples = num_samples
        self.chunk = math.ceil(num_samples / self.processes)
        self.low, self.high = block_of(self.rank, num_samples, self.processes)
        if memmap_path is not None:
            memmap_path = Path(memmap_path)
            memmap_path = memmap_path.with_name(f"{memmap_path.name}.rank{self.rank}")
        # A process that owns no sample (N < W·⌈N/W⌉) keeps a 1-row store nobody reads.
        self.saf = SAF(max(self.high - self.low, 1), num_classes, lam, tau, lag_epochs,
                       start_epoch, store_dtype, device, memmap_path, top_k=top_k)  # fmt: skip
        self._last: _LastCall | None = None
        self._rows_this_epoch = 0
        self._warned_set_epoch = False

    @classmethod
    def from_saf(cls, saf: SAF, process_group: ProcessGroup = None) -> ShardedSAF:
        """A sharded store with ``saf``'s settings, epoch and contents (this process's
        block of them); ``saf`` itself is left alone."""
        if not isinstance(saf, SAF):
            raise TypeError(f"expected a flatmin.SAF, got {type(saf).__name__}")
        store = saf.store
        sharded = cls(saf.num_samples, saf.num_classes, saf.lam, saf.tau, saf.lag_epochs,
                      saf.start_epoch, store.dtype, store.device, top_k=saf.top_k,
                      process_group=process_group)  # fmt: skip
        sharded.load_state_dict(saf.state_dict())
        return sharded

    # -- SAF's surface ----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.saf.num_classes

    @property
    def store(self) -> LogitStore:
        """This process's block of the store (local sample ``j`` is sample ``low + j``)."""
        return self.saf.store

    @property
    def lam(self) -> float:
        return self.saf.lam

    @property
    def tau(self) -> float:
        return self.saf.tau

    @property
    def epoch(self) -> int:
        return self.saf.epoch

    @property
    def active(self) -> bool:
        return self.saf.active

    @property
    def memory_bytes(self) -> int:
        """Bytes of the store on *this* process: its block, ``≈ 1/W`` of the whole."""
        return self.saf.memory_bytes

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch (call on every process at every epoch start)."""
        if epoch != self.saf.epoch:
            self._rows_this_epoch = 0
        self.saf.set_epoch(epoch)
        self._last = None

    # -- the exchange -------------------------------------------------------------------

    def exchange(
        self, logits: Tensor, indices: Tensor, record: bool = True
    ) -> tuple[Rows, Tensor, Tensor]:
        """Look this process's batch up in the owners' blocks (and record it there).

        Returns ``(targets, valid, global_valid_count)`` as
        :meth:`~flatmin.distributed.saf.DistributedSAF.exchange` does: the rows read, in
        the store's format, their validity and the global batch's number of valid rows,
        on ``logits``' device.
        """
        self._check_batch(logits, indices)
        processes, group, device = self.processes, self.process_group, logits.device
        idx = indices.to(device=device, dtype=torch.long)
        last = self._last
        repeated = last is not None and last.matches(idx)
        owner = torch.div(idx, self.chunk, rounding_mode="floor")
        send = torch.bincount(owner, minlength=processes)
        flags = torch.tensor([self.epoch, int(record), int(repeated)], device=device)
        header = torch.cat([send, flags])
        table = _all_gather_header(header, processes, group)
        _check_agreement(table[:, processes:], processes)
        if bool(table[:, processes + 2].all()):  # every process repeats its last batch
            return last.targets, last.valid, last.count
        rows = self.store.encode(logits, self.tau)
        order = torch.argsort(owner, stable=True)
        # Rows go along on read-only calls too: the owner counts those it could not record.
        requests = [_bytes_of(idx[order]), *(_bytes_of(part[order]) for part in rows)]
        sent, received = send.tolist(), table[:, self.rank][:processes].tolist()
        incoming = _all_to_all(torch.cat(requests, dim=1), received, sent, group)
        fields = incoming.split([8, *(_row_bytes(part) for part in rows)], dim=1)
        local = _as_type(fields[0], torch.long, ()) - self.low
        got = tuple(_as_type(f, p.dtype, p.shape[1:]) for f, p in zip(fields[1:], rows))
        read = self.store.exchange_rows(got, local, self.epoch, record)  # the owner's part
        reply = [_bytes_of(read.valid.to(torch.uint8)), *(_bytes_of(p) for p in read.rows)]
        answers = _all_to_all(torch.cat([r.to(device) for r in reply], dim=1), sent,
                              received, group)  # fmt: skip
        fields = answers.split([1, *(_row_bytes(part) for part in rows)], dim=1)
        valid = torch.empty(idx.numel(), dtype=torch.bool, device=device)
        valid[order] = _as_type(fields[0], torch.uint8, ()).bool()
        targets = []
        for field, part in zip(fields[1:], rows):
            target = torch.empty_like(part)
            target[order] = _as_type(field, part.dtype, part.shape[1:])
            targets.append(target)
        counts = torch.stack([valid.sum(), read.skipped.to(device)])
        if processes > 1:
            dist.all_reduce(counts, group=group)
        count = counts[0]
        self._note_rows(int(table[:, :processes].sum()), counts[1], record)
        result = (tuple(targets), valid, count)
        if record:
            self._last = _LastCall(idx, *result)
        return result

    def __call__(self, logits: Tensor, indices: Tensor, record: bool = True) -> Tensor:
        """This process's share of ``λ·τ²·mean KL(past ‖ present)`` over the global batch
        (see the module docstring)."""
        targets, valid, global_count = self.exchange(logits, indices, record)
        if not self.active or self.lam == 0:
            return zero_term(logits)
        local_mean = self.store.kl(logits, targets, self.tau, valid)
        dtype = local_mean.dtype
        share = valid.sum().to(dtype) * self.processes / global_count.to(dtype).clamp(min=1)
        return self.lam * local_mean * share

    # -- checks and warnings -----------------------------------------------------------

    def _check_batch(self, logits: Tensor, indices: Tensor) -> None:
        """SAF's checks of a batch: the block's store checks shapes and dtypes, the range
        is checked against the whole store's ``num_samples`` here."""
        if isinstance(indices, Tensor) and indices.numel() and not indices.is_floating_point():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_samples:
                raise ValueError(
                    f"expected indices in [0, {self.num_samples}), got values in [{low}, {high}]"
                )
            indices = torch.zeros_like(indices)  # in the block store's range
        self.store.check_batch(logits, indices)

    def _note_rows(self, rows: int, skipped: Tensor, record: bool) -> None:
        """SAF's warnings, for the global batch: non-finite rows and a forgotten set_epoch."""
        count = int(skipped)
        if count:
            warnings.warn(
                f"SAF: {count} logit row(s) were not finite in the store's dtype and were "
                "not recorded; those samples will have no target in a later epoch",
                RuntimeWarning,
                stacklevel=4,
            )
        if not record:
            return
        self._rows_this_epoch += rows
        if self._rows_this_epoch >= 2 * self.num_samples and not self._warned_set_epoch:
            self._warned_set_epoch = True
            warnings.warn(
                f"SAF: {self._rows_this_epoch} rows were recorded in epoch {self.epoch}, "
                f"twice the {self.num_samples} samples: call saf.set_epoch(epoch) with the "
                "0-based epoch at the start of every epoch",
                RuntimeWarning,
                stacklevel=4,
            )

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """SAF's state, with the store as this process's block of the global table: a
        ``DTensor`` shard of ``(Ẽ, N, C)`` (and ``(Ẽ, N)`` for the epochs) in a process
        group, the whole table on one process. References, not copies."""
        state = self.saf.state_dict()
        rows = self.high - self.low
        state["store"] = {
            name: self._global(table[:, :rows]) for name, table in state["store"].items()
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state of :meth:`state_dict` (any number of processes: DTensor shards
        are this block's already) or of a :class:`flatmin.SAF` over all ``N`` samples."""
        store = state["store"]
        rows = self.high - self.low
        blocks = {}
        for name, saved in store.items():
            if isinstance(saved, DTensor):
                saved = saved.to_local()
            elif saved.ndim >= 2 and saved.shape[1] == self.num_samples:
                saved = saved[:, self.low : self.high]
            blocks[name] = saved
        mine = self.store.state_dict()
        for name, block in blocks.items():
            if name in mine and tuple(block.shape[1:2]) != (rows,):
                raise ValueError(
                    f"expected the store's {name!r} over {self.num_samples} samples (this "
                    f"process's block: {rows}), got shape {tuple(block.shape)}"
                )
        padded = {
            name: torch.cat([block, mine[name][:, rows:]], dim=1) for name, block in blocks.items()
        }
        self.saf.load_state_dict({**state, "store": padded})
        self._last = None

    def _global(self, block: Tensor) -> Tensor:
        if not dist.is_initialized():
            return block
        mesh = DeviceMesh.from_group(self.process_group or dist.group.WORLD, block.device.type)
        shape = (block.shape[0], self.num_samples, *block.shape[2:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(block, mesh, [Shard(1)], run_check=False, shape=shape,
                                  stride=stride)  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"ShardedSAF(num_samples={self.num_samples}, block=[{self.low}, {self.high}), "
            f"processes={self.processes}, saf={self.saf!r})"
        )


class _LastCall:
    """The previous recording call's indices and what it returned, for repeated passes."""

    def __init__(self, indices: Tensor, targets: Rows, valid: Tensor, count: Tensor) -> None:
        self.indices = indices.clone()
        self.targets, self.valid, self.count = targets, valid, count

    def matches(self, indices: Tensor) -> bool:
        return indices.shape == self.indices.shape and torch.equal(indices, self.indices)


def _all_gather_header(header: Tensor, processes: int, group: ProcessGroup) -> Tensor:
    if processes == 1:
        return header[None]
    flat = header.new_empty(processes * header.numel())  # gloo wants a flat output
    dist.all_gather_single(flat, header, group=group)
    return flat.view(processes, -1)


def _check_agreement(flags: Tensor, processes: int) -> None:
    """Raise on every process if the processes' epochs or record flags differ."""
    epochs = sorted(set(flags[:, 0].tolist()))
    if len(epochs) > 1:
        raise ValueError(
            f"ShardedSAF: the processes are at different epochs {epochs}; call "
            "set_epoch(epoch) with the same epoch on every process"
        )
    if len(set(flags[:, 1].tolist())) > 1:
        raise ValueError(
            "ShardedSAF: the processes passed different record flags; every process must "
            "record (or only read) in the same call"
        )


def _all_to_all(rows: Tensor, output_split: list[int], input_split: list[int],
                group: ProcessGroup) -> Tensor:  # fmt: skip
    """``all_to_all_single`` of byte rows (any split sizes; a no-op on one process)."""
    if len(input_split) == 1:
        return rows
    out = rows.new_empty((sum(output_split), rows.shape[1]))
    dist.all_to_all_single(out, rows.contiguous(), output_split, input_split, group=group)
    return out


def _bytes_of(tensor: Tensor) -> Tensor:
    """``(B, …)`` tensor → its ``(B, bytes per row)`` uint8 view (of a contiguous copy)."""
    flat = tensor.contiguous().reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
    return flat.view(torch.uint8)


def _row_bytes(tensor: Tensor) -> int:
    return math.prod(tensor.shape[1:]) * tensor.element_size()


def _as_type(field: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Byte rows (a column slice of received rows) → ``(n, *shape)`` in ``dtype``; the
    copy starts at offset 0, as ``view(dtype)`` needs."""
    return field.reshape(-1).clone().view(dtype).reshape(field.shape[0], *shape)
