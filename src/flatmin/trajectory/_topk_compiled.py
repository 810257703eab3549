"""SAF's ``top_k`` store on the CPU as compiled loops: the encode and the bucketed term.

Both are a few dozen operations per row. As eager torch ops each is one dispatch
(``topk``, the rest's log-sum-exp, the packing; the term's gathers, scatters and two small
softmaxes), and at ``C = 10`` or ``100`` classes that dispatch, not the arithmetic, is
their cost. Here each is one pass over the batch (:mod:`flatmin.trajectory._topk_loops`,
compiled by numba), writing straight into the packed rows and into the gradient. The
arithmetic is the eager code's
(:meth:`~flatmin.trajectory.topk_store.TopKLogitStore.encode`,
:func:`~flatmin.trajectory.kl.bucketed_tempered_kl`); the values agree with it to float32
rounding, not bit for bit (sums run in another order, ``exp`` is a polynomial within
2 ulp). The same store always encodes the same way, so a resumed run stays bit-exact.

Used for float32 logits on the CPU when numba is installed (``pip install flatmin[fast]``)
and not switched off (``FLATMIN_NUMBA=0``, :data:`ENABLED`); everything else takes the
eager code, and so does a term whose logits hold inf or NaN in a counted row (the eager
code defines what those give).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
from torch import Tensor

ENABLED = importlib.util.find_spec("numba") is not None and os.environ.get("FLATMIN_NUMBA") != "0"
"""Whether the compiled loops are used where they apply: numba is installed and the
environment variable ``FLATMIN_NUMBA`` is not ``0``."""

_loops = None
_NO_MASK = np.ones(1, dtype=np.bool_)
_NUMPY_INTEGERS = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}


def applies(logits: Tensor) -> bool:
    """Whether the compiled loops take ``logits``: float32 on the CPU, numba present."""
    return ENABLED and logits.dtype == torch.float32 and logits.device.type == "cpu"


def encode_rows(
    logits: Tensor, rows: Tensor, fields: dict[str, tuple[int, int]], half: bool,
    classes: torch.dtype, tau: float, overflow: float,
) -> None:  # fmt: skip
    """Write each row's top ``k`` logits (largest first; of equal ones the lower class
    first), their classes and ``log Σ_{j∉top} exp(z_j/τ)`` into packed rows: ``rows``
    ``(B, row bytes)`` uint8, ``fields`` the byte range of each field (``"values"``,
    float16 if ``half`` else float32; ``"classes"``, of dtype ``classes``; ``"rest_lse"``,
    float32).

    A row holding NaN or a logit of magnitude ``≥ overflow`` (inf in the store dtype) gets
    ``rest_lse = NaN``; with ``k = C`` the other rows get ``−inf``.
    """
    table = rows.numpy()
    _get_loops().encode(
        _numpy(logits.detach()),
        _view(table, fields["values"], np.int16 if half else np.int32),
        half,
        _view(table, fields["classes"], _NUMPY_INTEGERS[classes]),
        _view(table, fields["rest_lse"], np.float32),
        np.float32(1.0 / tau),
        overflow,
    )


def bucketed_forward(
    logits: Tensor, top_logits: Tensor, index: Tensor, rest_lse: Tensor,
    valid: Tensor | None, tau: float, weight: float,
) -> tuple[Tensor, Tensor] | None:  # fmt: skip
    """``weight·τ²·mean KL_k`` and its gradient with respect to ``logits`` (the closed form
    of :class:`~flatmin.trajectory.kl._BucketedKL`), or ``None`` when a counted row of
    ``logits`` is not finite. ``rest_lse`` is a ``(B, 1)`` column. A class of a counted
    row outside ``[0, C)`` is a ValueError, raised before any memory is read through it
    (the loops do not check bounds)."""
    z = _numpy(logits.detach())
    half = top_logits.dtype == torch.float16
    top = _bits(top_logits if half else top_logits.to(torch.float32))
    grad = torch.empty(logits.shape, dtype=torch.float32)
    value = torch.empty(1, dtype=torch.float32)
    loops = _get_loops()
    outcome = loops.bucketed(
        z, top.numpy(), half, index.numpy(), rest_lse.to(torch.float32).numpy(),
        _NO_MASK if valid is None else valid.numpy(), valid is not None,
        np.float32(tau), np.float32(weight * tau * tau), np.float32(weight * tau),
        grad.numpy(), value.numpy(),
    )  # fmt: skip
    if outcome == loops.BAD_CLASS:
        raise ValueError(
            f"expected the stored classes of every counted row in [0, {logits.shape[1]}); "
            "got others (rows not written by this store, or a corrupted store state)"
        )
    return (value[0], grad) if outcome == loops.DONE else None


def _get_loops():
    global _loops
    if _loops is None:
        from flatmin.trajectory import _topk_loops

        _loops = _topk_loops
    return _loops


def _view(table: np.ndarray, columns: tuple[int, int], dtype: type) -> np.ndarray:
    return table[:, columns[0] : columns[1]].view(dtype)


def _numpy(values: Tensor) -> np.ndarray:
    return (values if values.is_contiguous() else values.contiguous()).numpy()


def _bits(values: Tensor) -> Tensor:
    """float16 or float32 ``values`` as their bit patterns (int16 or int32), the form the
    loops read and write them in."""
    return values.view(torch.int16 if values.dtype == torch.float16 else torch.int32)
