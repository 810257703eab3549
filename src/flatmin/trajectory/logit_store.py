"""Per-sample storage of past training logits for SAF (Du et al., NeurIPS 2022).

SAF compares each sample's current logits with the logits the training forward pass
produced for the same sample ``Ẽ`` epochs earlier. The store therefore keeps, for every
sample, the logits of its last ``Ẽ`` epochs in ``Ẽ`` slots: epoch ``e`` uses slot
``e mod Ẽ``, which holds epoch ``e − Ẽ``'s logits until epoch ``e`` overwrites it. Each
visit *reads the slot before overwriting it*, so ``Ẽ`` slots suffice where the official
code keeps ``Ẽ + 1``.

Next to each slot the store keeps the epoch that wrote it (int32). A read at epoch ``e``
is *valid* only if that epoch is exactly ``e − Ẽ``; anything else (never written, a
skipped epoch, a slot already rewritten in epoch ``e`` because the sampler repeated the
index) is reported invalid instead of returning a wrong target.

Memory: ``num_samples · num_classes · Ẽ · itemsize`` for the logits plus
``num_samples · Ẽ · 4`` bytes of bookkeeping (see :attr:`LogitStore.memory_bytes`).

**Rows.** What a store keeps per sample and slot is a *row*, handled as a tuple of tensors
with leading dimension ``B`` (:data:`Rows`): :meth:`LogitStore.encode` turns a batch of
logits into rows, :meth:`LogitStore.exchange_rows` reads and writes rows, and
:meth:`LogitStore.kl` computes the term against rows read. Here a row is the logits in the
store dtype, ``(logits[B, C],)``; :class:`~flatmin.trajectory.topk_store.TopKLogitStore`
keeps a compressed row. Code that moves rows between processes (the distributed stores)
moves these tuples without knowing what is inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatmin.optim._checks import check_choice, check_int
from flatmin.trajectory.kl import tempered_kl

Rows = tuple[Tensor, ...]
"""A batch of stored rows: tensors with leading dimension ``B``, one per table of the store."""

NEVER_WRITTEN = torch.iinfo(torch.int32).min
"""Epoch recorded in a slot nothing has been written to (never equal to ``e − Ẽ``)."""

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.uint8: np.uint8}
_STORE_DTYPES = (torch.float16, torch.float32)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class Exchange:
    """What one :meth:`LogitStore.exchange` call read and how much it skipped.

    Attributes:
        rows: the stored rows read for the batch (:data:`Rows`; for :class:`LogitStore`
            ``(logits[B, C],)`` in the store dtype), on the store's device; rows that are
            not ``valid`` hold arbitrary finite values.
        valid: ``(B,)`` bool, True where the row was written exactly ``Ẽ`` epochs ago.
        skipped: number of rows not recorded because they were not finite in the store
            dtype (a 0-dim int64 tensor on the store's device).
    """

    rows: Rows
    valid: Tensor
    skipped: Tensor


class LogitStore:
    """``Ẽ`` slots of logits per sample with the epoch that wrote each slot.

    Args:
        num_samples: size of the training set (indices are ``0 … num_samples − 1``).
        num_classes: number of logits per sample.
        num_slots: ``Ẽ``, the lag in epochs between a write and the read that uses it.
        dtype: ``torch.float16`` (default: halves the memory; relative rounding error at
            most ``2⁻¹¹`` in the normal range) or ``torch.float32``.
        device: where the slots live; the CPU by default, the training device on request.
        memmap_path: if given, the slots live in a memory-mapped file created (or
            overwritten) at this path, for datasets whose store does not fit in memory.
            Only with a CPU store.

    Layout: ``table[slot, sample, :]`` (here ``table = logits``, ``(Ẽ, N, C)``) and
    ``written_epoch[slot, sample]``, so one slot is a contiguous ``(N, row width)`` table
    served by ``index_select`` and ``index_copy_``.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        num_slots: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        memmap_path: str | Path | None = None,
    ) -> None:
        num_samples = check_int("num_samples", num_samples, minimum=1)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        num_slots = check_int("num_slots", num_slots, minimum=1)
        check_choice("dtype", dtype, _STORE_DTYPES)
        device = torch.device(device)
        if memmap_path is not None and device.type != "cpu":
            raise ValueError(f"a memory-mapped store must be on the CPU, got device={device}")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = device
        self.memmap_path = None if memmap_path is None else Path(memmap_path)
        width, table_dtype = self._row_layout()
        shape = (num_slots, num_samples, width)
        self._memmap: np.memmap | None = None
        if self.memmap_path is None:
            self.table = torch.zeros(shape, dtype=table_dtype, device=device)
        else:
            self._memmap = np.memmap(
                self.memmap_path, dtype=_NUMPY_DTYPES[table_dtype], mode="w+", shape=shape
            )
            self.table = torch.from_numpy(self._memmap)
        self.written_epoch = torch.full(
            (num_slots, num_samples), NEVER_WRITTEN, dtype=torch.int32, device=device
        )

    # -- the row format (what a subclass changes) --------------------------------------

    _TABLE_KEY = "logits"  # the table's name in state_dict()

    def _row_layout(self) -> tuple[int, torch.dtype]:
        """The width of a row and the table's dtype: here ``C`` logits in the store dtype."""
        return self.num_classes, self.dtype

    @property
    def logits(self) -> Tensor:
        """The stored logits, ``(Ẽ, N, C)`` in the store dtype (the table itself)."""
        return self.table

    def encode(self, logits: Tensor, tau: float | None = None) -> Rows:
        """The batch's logits as rows to store, on ``logits``' device: ``(logits[B, C],)``
        in the store dtype (``tau`` is not needed by full rows)."""
        return (_as_dtype_on(logits.detach(), self.dtype, logits.device),)

    def _finite_rows(self, rows: Rows) -> Tensor:
        """``(B,)`` bool: which encoded rows may be written (finite in the store dtype)."""
        # x·0 is 0 for a finite x and NaN otherwise, so a row sums to 0 iff it is finite.
        return rows[0].mul(0).sum(dim=1) == 0

    def kl(
        self, logits: Tensor, rows: Rows, tau: float, valid: Tensor | None = None,
        *, weight: float = 1.0,
    ) -> Tensor:  # fmt: skip
        """``weight·τ²·mean KL(past ‖ present)`` against rows read from this store
        (:func:`~flatmin.trajectory.kl.tempered_kl`)."""
        return tempered_kl(logits, rows[0], tau, valid, weight=weight)

    # -- size, checks, the exchange ----------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        """Bytes held: the table (here ``N·C·Ẽ·itemsize``) plus ``N·Ẽ·4`` for the epochs."""
        return (
            self.table.numel() * self.table.element_size()
            + self.written_epoch.numel() * self.written_epoch.element_size()
        )

    def check_batch(self, logits: Tensor, indices: Tensor) -> None:
        """Raise a ValueError/TypeError naming the expected shapes if the batch is unusable."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError(f"expected floating-point logits, got {_describe(logits)}")
        if not isinstance(indices, Tensor):
            raise TypeError(
                "expected the batch's sample indices as an integer tensor of shape (B,) "
                f"(wrap the dataset in flatmin.data.WithIndex), got {_describe(indices)}"
            )
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits of shape (B, {self.num_classes}), got {tuple(logits.shape)}"
            )
        batch = logits.shape[0]
        if indices.dtype not in _INDEX_DTYPES:
            raise TypeError(f"expected integer sample indices, got dtype {indices.dtype}")
        if indices.shape != (batch,):
            raise ValueError(
                f"expected indices of shape ({batch},) to match logits {tuple(logits.shape)}, "
                f"got {tuple(indices.shape)}"
            )
        if batch:
            low, high = _index_range(indices)
            if low < 0 or high >= self.num_samples:
                raise ValueError(
                    f"expected indices in [0, {self.num_samples}), got values in [{low}, {high}]"
                )

    def exchange(
        self,
        logits: Tensor,
        indices: Tensor,
        epoch: int,
        record: bool = True,
        *,
        tau: float | None = None,
    ) -> Exchange:
        """Read the batch's slot for ``epoch``, then (if ``record``) write ``logits`` there.

        Checks the batch, then :meth:`exchange_rows` of :meth:`encode` (``tau``: the
        temperature a compressed row needs). Each sample is read and written at most once
        per epoch, at its first visit:

        - a row is ``valid`` if its slot was written in epoch ``epoch − Ẽ`` and no earlier
          row of the batch has the same index (a later visit in the same epoch finds the
          slot rewritten, so it is invalid too);
        - a sample whose slot was already written in ``epoch`` keeps that first entry, and
          rows that are not finite once cast to the store dtype are not written.

        No host synchronization is needed apart from the validation of the indices.
        """
        self.check_batch(logits, indices)
        return self.exchange_rows(self.encode(logits, tau), indices, epoch, record)

    def exchange_rows(
        self, rows: Rows, indices: Tensor, epoch: int, record: bool = True
    ) -> Exchange:
        """:meth:`exchange` for rows already encoded (e.g. by another process).

        ``rows`` come from :meth:`encode` (any device; moved here); ``indices`` are
        trusted to lie in ``[0, num_samples)``, as :meth:`check_batch` ensures.
        """
        self._check_rows(rows, indices)
        slot = epoch % self.num_slots
        table, epochs = self.table[slot], self.written_epoch[slot]
        idx = _as_long_on(indices, self.device)
        old_rows = table.index_select(0, idx)
        old_epochs = epochs.index_select(0, idx)
        valid = old_epochs == epoch - self.num_slots
        # A CPU store checks on the host that the batch has no repeated index (the usual
        # case), which spares the sort that finds each row's first occurrence.
        first = None
        if self.device.type != "cpu" or not _unique_on_host(idx):
            first = _first_occurrence(idx)
            valid &= first == torch.arange(idx.numel(), device=idx.device)
        new_rows = _as_dtype_on(rows[0], self.table.dtype, self.device)
        finite = self._finite_rows((new_rows,))
        skipped = finite.logical_not().sum()
        if record:
            writable = finite & (old_epochs != epoch)
            if first is not None:
                writable, new_rows = writable[first], new_rows[first]
            merged = torch.where(writable[:, None], new_rows, old_rows)
            stamps = torch.where(writable, epoch, old_epochs)
            # Duplicate indices carry identical rows, so the order of the copies is moot.
            table.index_copy_(0, idx, merged)
            epochs.index_copy_(0, idx, stamps)
        return Exchange(rows=(old_rows,), valid=valid, skipped=skipped)

    def _check_rows(self, rows: Rows, indices: Tensor) -> None:
        width = self.table.shape[2]
        if (
            not isinstance(rows, tuple)
            or len(rows) != 1
            or rows[0].shape != (indices.shape[0], width)
            or rows[0].dtype != self.table.dtype
        ):
            got = [(tuple(r.shape), r.dtype) for r in rows] if isinstance(rows, tuple) else rows
            raise ValueError(
                f"expected rows ({indices.shape[0]}, {width}) of dtype {self.table.dtype} "
                f"as {type(self).__name__}.encode gives them, got {got}"
            )

    def state_dict(self) -> dict[str, Tensor]:
        """The slots and their epochs, as references (like ``nn.Module.state_dict``).

        Not cloned, so a large (or memory-mapped) store is not duplicated in memory;
        ``torch.save`` it, or ``copy.deepcopy`` it to keep a snapshot while training on.
        """
        return {self._TABLE_KEY: self.table, "written_epoch": self.written_epoch}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.state_dict()
        if set(state) != set(expected):
            raise ValueError(
                f"expected a {type(self).__name__} state with keys {sorted(expected)}, "
                f"got {sorted(state)}"
            )
        for name, mine in expected.items():
            theirs = state[name]
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise ValueError(
                    f"expected {name} of shape {tuple(mine.shape)} and dtype {mine.dtype}, "
                    f"got {tuple(theirs.shape)} and {theirs.dtype}"
                )
        for name, mine in expected.items():
            mine.copy_(state[name])

    def flush(self) -> None:
        """Write a memory-mapped store's pages to its file (no-op in memory)."""
        if self._memmap is not None:
            self._memmap.flush()


def _first_occurrence(idx: Tensor) -> Tensor:
    """For each position, the position of the first occurrence of its value in ``idx``.

    Fixed-size tensor ops only (a stable sort and a running maximum), so no host sync.
    """
    order = torch.argsort(idx, stable=True)
    ordered = idx[order]
    positions = torch.arange(idx.numel(), device=idx.device)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group_start = torch.where(starts, positions, 0).cummax(dim=0).values
    first = torch.empty_like(order)
    first[order] = order[group_start]
    return first


def _index_range(indices: Tensor) -> tuple[int, int]:
    """The smallest and largest index (one host read; numpy's for a CPU tensor)."""
    if indices.device.type == "cpu":
        values = indices.numpy()
        return int(values.min()), int(values.max())
    low, high = torch.aminmax(indices)
    return int(low), int(high)


def _unique_on_host(idx: Tensor) -> bool:
    """Whether the CPU tensor ``idx`` holds no value twice (sorted on the host by numpy)."""
    ordered = np.sort(idx.numpy())
    return not np.any(ordered[1:] == ordered[:-1])


def _as_long_on(indices: Tensor, device: torch.device) -> Tensor:
    """``indices`` as int64 on ``device``, without a dispatch when it already is."""
    if indices.dtype == torch.long and indices.device == device:
        return indices
    return indices.to(device=device, dtype=torch.long)


def _as_dtype_on(values: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` in ``dtype`` on ``device``, without a dispatch when it already is."""
    if values.dtype == dtype and values.device == device:
        return values
    return values.to(device=device, dtype=dtype)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if value is None else type(value).__name__
