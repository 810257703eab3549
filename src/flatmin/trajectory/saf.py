"""SAF: Sharpness-Aware training for Free (Du et al., NeurIPS 2022, arXiv 2205.14083)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatmin.optim._checks import check_int, check_real
from flatmin.trajectory.kl import zero_term
from flatmin.trajectory.logit_store import LogitStore, Rows
from flatmin.trajectory.topk_store import TopKLogitStore


class SAF:
    r"""The SAF trajectory loss: stay close to your own outputs of ``Ẽ`` epochs ago.

    Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022. The loss drop along the
    recent weight trajectory approximates SAM's sharpness, so instead of a second pass SAF
    penalizes how far each sample's outputs moved since ``Ẽ = lag_epochs`` epochs ago:

    .. math::
        L = \mathrm{CE}(z, y) + λ·τ²·\frac{1}{|V|}\sum_{i∈V}
            \mathrm{KL}\big(\mathrm{softmax}(\tilde z_i/τ)\,\|\,\mathrm{softmax}(z_i/τ)\big)

    where ``z_i`` are sample ``i``'s current logits, ``z̃_i`` the raw logits the training
    forward pass produced for the same sample index ``Ẽ`` epochs earlier (a constant: the
    gradient flows through ``z_i`` only), and ``V`` the batch rows that have such a target.
    The τ² factor is in the official code, not in the paper's Eq. 8. Usage
    (``set_epoch`` at the start of every epoch: without it the term stays 0.0):

    .. test: setup=sgd check="saf.active"

    ::

        from torch.utils.data import DataLoader
        from flatmin.data import WithIndex

        loader = DataLoader(WithIndex(train_set), batch_size=128, shuffle=True)
        saf = SAF(num_samples=len(train_set), num_classes=10)
        for epoch in range(epochs):
            saf.set_epoch(epoch)
            for x, y, idx in loader:
                logits = model(x)
                loss = F.cross_entropy(logits, y) + saf(logits, idx)
                opt.zero_grad(); loss.backward(); opt.step()

    **Counting epochs.** ``set_epoch`` takes 0-based epochs, as the official code's loop
    does, and the term is active when ``epoch > start_epoch`` (the official condition):
    with ``start_epoch=5`` epochs 0–5 train on the cross entropy only and the term starts
    in the 7th epoch. The paper's text ("after ``E_start`` epochs") would start it in the
    6th epoch (``epoch >= start_epoch``); pass ``start_epoch - 1`` for that. Logits are
    recorded in every epoch, so targets exist as soon as the term starts.

    **Which rows count.** Each sample is compared and recorded at most once per epoch, at
    its first visit in that epoch, and its target is used only if it was written exactly
    ``lag_epochs`` epochs before the current epoch. So a sample has no valid target in its
    first ``lag_epochs`` epochs, after an epoch in which it was not seen (skipped epochs,
    subsampling), and on a repeated visit within one epoch (a sampler that repeats
    indices, in the same batch or another one); such rows are left out: the KL is the
    mean over valid rows only, and an exact zero (attached to the graph) when no row is
    valid. Rows that are not finite in the store dtype are never recorded (a warning gives
    the count).

    **A forgotten** ``set_epoch``. Without it every epoch is the same epoch to SAF: no
    target ever becomes valid and the term never starts. Once the rows recorded since the
    epoch last changed reach ``2·num_samples`` (no one-pass-per-epoch loop does that), SAF
    warns once, naming ``set_epoch``; the count is of batch sizes, on the host, so it costs
    no device synchronization.

    **Several passes over one batch (SAM, ESAM, …).** A call whose ``indices`` equal those
    of the previous recording call within the same epoch is another pass over the same
    batch: it is compared with the targets the first call read and records nothing. So a
    SAM closure can call ``saf(logits, idx)`` unchanged in both passes; the store holds
    the first pass's logits (those at ``w``, not at ``w + ε``). ``record=False`` reads
    without writing in any other situation.

    **Memory.** ``lag_epochs`` slots per sample and class (each slot is read before it is
    overwritten; the official code keeps ``Ẽ + 1`` float32 slots) in ``store_dtype``, plus
    4 bytes per sample and slot for the epoch that wrote it:

    .. code-block:: text

        memory_bytes = N·C·Ẽ·itemsize + N·Ẽ·4

    ImageNet-1k (N = 1,281,167, C = 1000) in float16 needs 7,346 MiB at Ẽ = 3 and 4,897 MiB
    at the official ImageNet script's Ẽ = 2, where the paper reports 14,643 MB for the
    official code's Ẽ + 1 = 3 float32 slots; CIFAR-10 at Ẽ = 3: 3.6 MB.

    **A compressed store:** ``top_k=k``. Each slot then keeps only the ``k`` largest past
    logits, their classes and the log-sum-exp of the other classes' tempered logits
    (:class:`~flatmin.trajectory.TopKLogitStore`), and the term treats the
    classes outside the top ``k`` as one bucket
    (:func:`~flatmin.trajectory.bucketed_tempered_kl`): never more than the full KL,
    equal to it at ``k = C``, the same rows valid and recorded. Memory per sample and slot
    is ``⌈(4 + k·(itemsize + class bytes))/4⌉·4 + 4`` bytes instead of ``C·itemsize + 4``:
    ImageNet-1k at ``k = 10``, Ẽ = 3: 176 MiB. It is an approximation of the term: the
    bucket keeps the past mass outside the top ``k`` but not its shape, so a small ``k``
    changes the gradient most where the tempered distribution is flat; and selecting the
    top ``k`` is extra work per step. Worth it when the full store does not fit (hundreds
    of classes and more); at ``C = 10`` a row of ``k = 5`` is as large as a full one.

    Args:
        num_samples: number of training samples (indices ``0 … num_samples − 1``).
        num_classes: number of logits per sample.
        lam: ``λ``, weight of the term (0.3 in the paper).
        tau: temperature ``τ`` (5).
        lag_epochs: ``Ẽ`` (3; the official ImageNet script uses 2).
        start_epoch: ``E_start`` (5), see "Counting epochs".
        store_dtype: ``torch.float16`` (default) or ``torch.float32``.
        device: where the store lives: the CPU (default) or the training device. On a
            device store, the count of skipped non-finite rows is reported at the next
            :meth:`set_epoch` or :meth:`state_dict`, so that the hot path stays free of
            host syncs.
        memmap_path: keep the store in a memory-mapped file at this path (created or
            overwritten), for datasets whose store does not fit in memory.
        top_k: ``None`` (default) keeps full rows; ``k`` in ``1 … num_classes`` keeps the
            compressed rows described under "A compressed store".
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
    ) -> None:
        self.lam = check_real("lam", lam, minimum=0.0)
        self.tau = check_real("tau", tau, minimum=0.0, exclusive_minimum=True)
        self.lag_epochs = check_int("lag_epochs", lag_epochs, minimum=1)
        self.start_epoch = check_int("start_epoch", start_epoch)
        self.store: LogitStore
        if top_k is None:
            self.store = LogitStore(
                num_samples, num_classes, lag_epochs, store_dtype, device, memmap_path
            )
        else:
            self.store = TopKLogitStore(
                num_samples, num_classes, lag_epochs, top_k, store_dtype, device, memmap_path
            )
        self.top_k = top_k
        self.epoch = 0
        self._last: _LastBatch | None = None
        self._unreported_skips: Tensor | None = None
        self._rows_this_epoch = 0
        self._warned_set_epoch = False

    @property
    def num_samples(self) -> int:
        return self.store.num_samples

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def memory_bytes(self) -> int:
        """The store's size in bytes, ``N·C·Ẽ·itemsize + N·Ẽ·4`` (full rows) or
        ``N·Ẽ·(row_bytes + 4)`` (``top_k``); see the class docstring."""
        return self.store.memory_bytes

    @property
    def active(self) -> bool:
        """Whether the current epoch adds the term (``epoch > start_epoch``)."""
        return self.epoch > self.start_epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch; call it at the start of every epoch."""
        epoch = check_int("epoch", epoch, minimum=0)
        self._report_skips()
        if epoch != self.epoch:
            self._rows_this_epoch = 0
        self.epoch = epoch
        self._last = None

    def __call__(self, logits: Tensor, indices: Tensor, record: bool = True) -> Tensor:
        """Record the batch's logits and return ``λ·τ²·mean KL(past ‖ present)``.

        Args:
            logits: the training forward pass's logits, shape ``(B, num_classes)``.
            indices: the samples' dataset indices, integer tensor of shape ``(B,)``.
            record: write the (detached) logits into the store; ``False`` only reads.

        Returns:
            A scalar in ``logits``' dtype promoted to at least float32; an exact zero
            attached to ``logits``' graph before the term starts or without valid rows.
        """
        targets, valid = self.lookup(logits, indices, record)
        if not self.active or self.lam == 0:
            return zero_term(logits)
        return self.store.kl(logits, targets, self.tau, valid, weight=self.lam)

    def lookup(self, logits: Tensor, indices: Tensor, record: bool = True) -> tuple[Rows, Tensor]:
        """The batch's targets and their validity; records the batch if ``record``.

        Returns ``(targets, valid)`` on ``logits``' device: the stored rows of
        ``lag_epochs`` epochs ago in the store's row format (full rows: ``(logits[B, C],)``
        in the store dtype; ``top_k``: compressed rows), and a ``(B,)`` bool mask of the
        rows that have one (see "Which rows count"); ``self.store.kl`` computes the term
        against them. Another pass over the previous recording call's batch returns what
        that call read and records nothing.
        """
        previous = self.previous_lookup(indices)
        if previous is not None:
            self.store.check_batch(logits, indices)
            return previous
        self.store.check_batch(logits, indices)
        return self._exchange(self.store.encode(logits, self.tau), indices, record)

    def lookup_rows(self, rows: Rows, indices: Tensor, record: bool = True) -> tuple[Rows, Tensor]:
        """:meth:`lookup` for a batch already encoded by ``self.store.encode`` (e.g. the
        global batch gathered from several processes), returned on the rows' device.

        The indices are trusted (``self.store.check_batch`` checks them with the logits).
        """
        previous = self.previous_lookup(indices)
        if previous is not None:
            return previous
        return self._exchange(rows, indices, record)

    def _exchange(self, rows: Rows, indices: Tensor, record: bool) -> tuple[Rows, Tensor]:
        exchange = self.store.exchange_rows(rows, indices, self.epoch, record=record)
        self._note_skips(exchange.skipped)
        device = rows[0].device
        targets = tuple(_on_device(part, device) for part in exchange.rows)
        valid = _on_device(exchange.valid, device)
        if record:
            self._last = _LastBatch(indices, targets, valid)
            self._count_rows(indices.shape[0])
        return targets, valid

    def previous_lookup(self, indices: Tensor) -> tuple[Rows, Tensor] | None:
        """What the previous recording call of this epoch read, if it had these ``indices``.

        ``None`` when ``indices`` differ (a new batch), so the caller must look it up.
        """
        last = self._last
        if last is not None and last.matches(indices):
            return last.targets, last.valid
        return None

    def state_dict(self) -> dict[str, Any]:
        """Store contents, the epochs that wrote them, the current epoch and the settings.

        The store's tensors are references, not copies (see ``LogitStore.state_dict``).
        """
        self._report_skips()
        return {
            "store": self.store.state_dict(),
            "epoch": self.epoch,
            "lam": self.lam,
            "tau": self.tau,
            "lag_epochs": self.lag_epochs,
            "start_epoch": self.start_epoch,
            "top_k": self.top_k,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s contents into this (identically shaped) SAF.

        Everything is checked before anything is changed.
        """
        _require_keys(state, _STATE_KEYS)
        if state["lag_epochs"] != self.lag_epochs:
            raise ValueError(
                f"expected a state with lag_epochs={self.lag_epochs}, got {state['lag_epochs']}"
            )
        top_k = state.get("top_k")  # absent from states saved before top_k existed
        if top_k != self.top_k:
            raise ValueError(
                f"expected a state with top_k={self.top_k}, got top_k={top_k} (a store of "
                f"{'full rows' if top_k is None else 'the top ' + str(top_k) + ' logits'})"
            )
        self.store.load_state_dict(state["store"])
        self.epoch = int(state["epoch"])
        self.lam = float(state["lam"])
        self.tau = float(state["tau"])
        self.start_epoch = int(state["start_epoch"])
        self._last = None
        self._rows_this_epoch = 0

    def _count_rows(self, rows: int) -> None:
        self._rows_this_epoch += rows
        if self._rows_this_epoch >= 2 * self.num_samples and not self._warned_set_epoch:
            self._warned_set_epoch = True
            warnings.warn(
                f"SAF: {self._rows_this_epoch} rows were recorded in epoch {self.epoch}, "
                f"twice the {self.num_samples} samples: call saf.set_epoch(epoch) with the "
                "0-based epoch at the start of every epoch. Within one epoch SAF compares "
                "and records each sample only at its first visit, so without it no target "
                "becomes valid and the term never starts",
                RuntimeWarning,
                stacklevel=4,
            )

    def _note_skips(self, skipped: Tensor) -> None:
        if self.store.device.type == "cpu":
            count = int(skipped)
            if count:
                _warn_skips(count)
        elif self._unreported_skips is None:
            self._unreported_skips = skipped.clone()
        else:
            self._unreported_skips += skipped

    def _report_skips(self) -> None:
        if self._unreported_skips is not None:
            count = int(self._unreported_skips)
            self._unreported_skips = None
            if count:
                _warn_skips(count)

    def __repr__(self) -> str:
        return (
            f"SAF(num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"lam={self.lam}, tau={self.tau}, lag_epochs={self.lag_epochs}, "
            f"start_epoch={self.start_epoch}, store_dtype={self.store.dtype}, "
            f"device={self.store.device}, top_k={self.top_k}, epoch={self.epoch})"
        )


_STATE_KEYS = {"store", "epoch", "lam", "tau", "lag_epochs", "start_epoch"}


def _require_keys(state: Mapping[str, Any], keys: Set[str]) -> None:
    """Raise a ValueError naming the missing keys unless ``state`` has all of ``keys``."""
    missing = keys - state.keys()
    if missing:
        raise ValueError(
            f"expected a SAF state with keys {sorted(keys)}; missing {sorted(missing)}"
        )


class _LastBatch:
    """The previous recording call's indices and the targets it read, for repeated passes."""

    def __init__(self, indices: Tensor, targets: Rows, valid: Tensor) -> None:
        self.indices = indices.clone()
        self.targets = targets
        self.valid = valid

    def matches(self, indices: Tensor) -> bool:
        return (
            isinstance(indices, Tensor)
            and indices.shape == self.indices.shape
            and indices.device == self.indices.device
            and torch.equal(indices, self.indices)
        )


def _on_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device`` (copied without blocking), with no dispatch if it is there."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


def _warn_skips(count: int) -> None:
    warnings.warn(
        f"SAF: {count} logit row(s) were not finite in the store's dtype and were not "
        "recorded; those samples will have no target in a later epoch",
        RuntimeWarning,
        stacklevel=4,
    )
