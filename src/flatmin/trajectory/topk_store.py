"""A compressed SAF store: per sample and slot, the top ``k`` past logits and the rest's mass.

SAF (Du et al., NeurIPS 2022) keeps ``N·C·Ẽ`` past logits, which at ImageNet-21k scale
(14.2 M samples × 21,841 classes) is terabytes even in float16. Its term only needs the
past distribution ``p = softmax(z̃/τ)``, and a KL that merges the classes outside the
``k`` largest past logits into one bucket
(:func:`~flatmin.trajectory.bucketed_tempered_kl`) needs only:

- the ``k`` largest past logits, in the store dtype (float16 by default),
- their classes, in the narrowest integer type that holds ``C`` (uint8 up to 256
  classes, int16 up to 32,768, int32 beyond),
- ``rest_lse = log Σ_{j∉top} exp(z̃_j/τ)``, the log-sum-exp of the tempered logits
  outside the top ``k`` (float32).

From these, the log-sum-exp over *all* classes is ``logaddexp(logsumexp(top/τ), rest_lse)``
and the bucket's mass is ``r = exp(rest_lse − that)``: known to float32 precision however
small it is. (Keeping the all-class log-sum-exp instead would give ``r`` only as
``1 − Σ_top p_i``, which cancels to noise when the top ``k`` hold nearly all the mass and
can turn negative once the top logits are rounded to float16.)

**Row layout.** The three fields of one sample and slot are packed into one row of bytes,
``rest_lse | values | classes`` (fields in decreasing item size, so each is aligned),
padded to a multiple of 4 bytes: ``row_bytes = ⌈(4 + k·(itemsize + class bytes))/4⌉·4``.
A slot is then one ``(N, row_bytes)`` uint8 table, and the look-up is the full store's:
one ``index_select`` and one ``index_copy_`` per batch, however many fields a row has.
:data:`~flatmin.trajectory.logit_store.Rows` of this store are ``(packed[B, row_bytes],)``;
:meth:`TopKLogitStore.unpack` views them as ``(values, classes, rest_lse)``.

Memory: ``N·Ẽ·(row_bytes + 4)`` bytes (the 4 for the epoch that wrote the slot), e.g.
ImageNet-1k (N = 1,281,167, C = 1000) at ``k = 10``, Ẽ = 3: 44 + 4 bytes per sample and
slot, 176 MiB — against 7,346 MiB for full float16 rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from flatmin.optim._checks import check_int
from flatmin.trajectory import _topk_compiled
from flatmin.trajectory.kl import bucketed_term, zero_term
from flatmin.trajectory.logit_store import LogitStore, Rows


class TopKRows(NamedTuple):
    """A batch of compressed rows, unpacked: ``values (B, k)`` in the store dtype (largest
    first), their ``classes (B, k)`` and ``rest_lse (B,)`` (float32)."""

    values: Tensor
    classes: Tensor
    rest_lse: Tensor


def class_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer dtype that holds the classes ``0 … num_classes − 1``."""
    num_classes = check_int("num_classes", num_classes, minimum=1)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if num_classes - 1 <= info.max:
            return dtype
    raise ValueError(f"num_classes must be at most 2**31, got {num_classes}")


class TopKLogitStore(LogitStore):
    """``Ẽ`` slots per sample of the ``k`` largest logits, their classes and the rest's mass.

    The bookkeeping (slots, epochs, first visits, memory maps, state dicts) is
    :class:`~flatmin.trajectory.logit_store.LogitStore`'s; only the row differs (see the
    module docstring). The term against these rows is
    :func:`~flatmin.trajectory.bucketed_tempered_kl` (``kl``).

    Args:
        num_samples, num_classes, num_slots, dtype, device, memmap_path: as for
            :class:`~flatmin.trajectory.logit_store.LogitStore` (``dtype`` is the values').
        top_k: ``k``, how many of the largest logits each row keeps (``1 … C``).

    Example::

        import torch
        from flatmin.trajectory.topk_store import TopKLogitStore

        store = TopKLogitStore(num_samples=100, num_classes=1000, num_slots=3, top_k=10)
        out = store.exchange(torch.randn(8, 1000), torch.arange(8), epoch=0, tau=5.0)
        values, classes, rest_lse = store.unpack(out.rows)   # (8, 10), (8, 10), (8,)
    """

    _TABLE_KEY = "rows"

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        num_slots: int,
        top_k: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        memmap_path: str | Path | None = None,
    ) -> None:
        self.class_dtype = class_dtype(num_classes)
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=num_classes)
        super().__init__(num_samples, num_classes, num_slots, dtype, device, memmap_path)
        info = torch.finfo(self.dtype)
        # Magnitudes from here on round to inf in the store dtype: max + half an ulp.
        self._overflow = info.max + info.eps * 2.0 ** (math.frexp(info.max)[1] - 1) / 2

    # -- the row format ----------------------------------------------------------------

    def _row_layout(self) -> tuple[int, torch.dtype]:
        k = self.top_k
        fields = [("values", self.dtype, k), ("classes", self.class_dtype, k)]
        fields.sort(key=lambda field: -field[1].itemsize)  # stable: aligned offsets
        self._fields = {"rest_lse": (0, 4)}
        offset = 4
        for name, dtype, count in fields:
            self._fields[name] = (offset, offset + count * dtype.itemsize)
            offset += count * dtype.itemsize
        self.row_bytes = -(-offset // 4) * 4
        self._padding = self.row_bytes - offset
        self._values_first = fields[0][0] == "values"
        self._zeros: dict[torch.device, Tensor] = {}
        return self.row_bytes, torch.uint8

    def _field(self, rows: Tensor, name: str, dtype: torch.dtype) -> Tensor:
        start, stop = self._fields[name]
        return rows[..., start:stop].view(dtype)

    def unpack(self, rows: Rows) -> TopKRows:
        """The fields of packed rows (views, no copy); ``rows`` as :meth:`encode` gives them
        or as :meth:`exchange` reads them."""
        (packed,) = rows
        return TopKRows(
            self._field(packed, "values", self.dtype),
            self._field(packed, "classes", self.class_dtype),
            self._field(packed, "rest_lse", torch.float32)[..., 0],
        )

    def pack(self, values: Tensor, classes: Tensor, rest_lse: Tensor) -> Rows:
        """Rows from their fields (``values`` in the store dtype, ``classes`` in
        :attr:`class_dtype`, ``rest_lse`` float32; all on one device)."""
        return self._pack_columns(values.contiguous(), classes.contiguous(), rest_lse[:, None])

    def _pack_columns(self, values: Tensor, classes: Tensor, rest_lse: Tensor) -> Rows:
        """:meth:`pack` of contiguous ``values`` and ``classes`` and ``rest_lse (B, 1)``."""
        parts = [rest_lse.view(torch.uint8), values.view(torch.uint8), classes.view(torch.uint8)]
        if self._values_first is False:
            parts[1], parts[2] = parts[2], parts[1]
        if self._padding:
            parts.append(values.new_zeros((values.shape[0], self._padding), dtype=torch.uint8))
        return (torch.cat(parts, dim=1),)

    @property
    def values(self) -> Tensor:
        """The stored top logits, ``(Ẽ, N, k)`` in the store dtype (a view of the table)."""
        return self._field(self.table, "values", self.dtype)

    @property
    def classes(self) -> Tensor:
        """Their classes, ``(Ẽ, N, k)`` in :attr:`class_dtype` (a view of the table)."""
        return self._field(self.table, "classes", self.class_dtype)

    @property
    def rest_lse(self) -> Tensor:
        """``log Σ_{j∉top} exp(z̃_j/τ)``, ``(Ẽ, N)`` float32 (a view of the table)."""
        return self._field(self.table, "rest_lse", torch.float32)[..., 0]

    @property
    def logits(self) -> Tensor:
        raise AttributeError(
            "a top-k store keeps no full logits; read .values, .classes and .rest_lse"
        )

    def encode(self, logits: Tensor, tau: float | None = None) -> Rows:
        """Compress a batch ``(B, C)`` of logits into rows, on ``logits``' device.

        ``tau`` is the temperature of ``rest_lse`` (required). A row that is not finite
        once cast to the store dtype gets ``rest_lse = NaN``, the mark that keeps it out
        of the store (as the full store keeps such rows out).

        float32 logits on the CPU are encoded by a compiled loop when numba is installed
        (``flatmin.trajectory._topk_compiled``): the same values and classes, the same
        ``rest_lse`` to float32 rounding.
        """
        if tau is None or not tau > 0:
            raise ValueError(f"a top-k store needs the temperature tau > 0, got {tau}")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits of shape (B, {self.num_classes}), got {tuple(logits.shape)}"
            )
        k, z = self.top_k, logits.detach()
        if _topk_compiled.applies(z):
            return self._encode_compiled(z, tau)
        with torch.no_grad():
            values, classes = z.topk(k, dim=1)
            # x·0 is 0 for a finite x and NaN otherwise: added to the rest's terms, the
            # row's logits in the store dtype mark a row that is not finite there.
            stored = z.to(self.dtype)
            if k < self.num_classes:
                inv_tau = 1.0 / tau
                if z.dtype == self._compute_dtype(z):
                    others = z.mul(inv_tau)
                else:
                    others = z.to(self._compute_dtype(z)).mul_(inv_tau)
                others.scatter_(1, classes, float("-inf")).addcmul_(stored, self._zero(z.device))
                # The rest's largest tempered logit: the shift that keeps its log-sum-exp
                # exact however far below the top it is.
                shift = others.amax(dim=1, keepdim=True)
                rest = others.sub_(shift).exp_().sum(dim=1, keepdim=True).log_().add_(shift)
                if rest.dtype != torch.float32:
                    rest = rest.to(torch.float32)
            else:
                rest = stored.mul(0).sum(dim=1, keepdim=True, dtype=torch.float32)
                rest = rest.sub_(float("inf"))
        return self._pack_columns(values.to(self.dtype), classes.to(self.class_dtype), rest)

    def _encode_compiled(self, z: Tensor, tau: float) -> Rows:
        make = torch.zeros if self._padding else torch.empty
        packed = make((z.shape[0], self.row_bytes), dtype=torch.uint8)
        half = self.dtype == torch.float16
        _topk_compiled.encode_rows(
            z, packed, self._fields, half, self.class_dtype, tau, self._overflow
        )
        return (packed,)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """:meth:`LogitStore.load_state_dict`, refusing (before anything is copied) rows
        whose classes are not in ``[0, C)``: a state of another store or a damaged file."""
        rows = state.get(self._TABLE_KEY)
        mine = self.table
        if isinstance(rows, Tensor) and (rows.shape, rows.dtype) == (mine.shape, mine.dtype):
            classes = self._field(rows, "classes", self.class_dtype)
            low, high = (int(classes.min()), int(classes.max())) if classes.numel() else (0, 0)
            if not 0 <= low <= high < self.num_classes:
                raise ValueError(
                    f"expected stored classes in [0, {self.num_classes}), got values in "
                    f"[{low}, {high}]"
                )
        super().load_state_dict(state)

    def _zero(self, device: torch.device) -> Tensor:
        zero = self._zeros.get(device)
        if zero is None:
            zero = self._zeros[device] = torch.zeros((), device=device)
        return zero

    @staticmethod
    def _compute_dtype(z: Tensor) -> torch.dtype:
        return torch.promote_types(z.dtype, torch.float32)

    def _finite_rows(self, rows: Rows) -> Tensor:
        rest = self._field(rows[0], "rest_lse", torch.float32)
        return (rest == rest)[:, 0]  # NaN marks a row that is not finite; −inf (k = C) is fine

    def kl(
        self, logits: Tensor, rows: Rows, tau: float, valid: Tensor | None = None,
        *, weight: float = 1.0,
    ) -> Tensor:  # fmt: skip
        """``weight·τ²·mean KL_k(past ‖ present)`` against rows read from this store
        (:func:`~flatmin.trajectory.bucketed_tempered_kl`)."""
        (packed,) = rows
        if packed.shape[0] == 0:
            return zero_term(logits)
        values = self._field(packed, "values", self.dtype)
        classes = self._field(packed, "classes", self.class_dtype)
        rest = self._field(packed, "rest_lse", torch.float32)  # (B, 1)
        return bucketed_term(logits, values, classes, rest, tau, valid, weight=weight)
