"""The numba loops behind :mod:`flatmin.trajectory._topk_compiled` (imported on first use).

One pass over the batch each, written so that the arithmetic loops over the classes
vectorize: branch-free, ``exp`` as an inlined polynomial (numba's ``math.exp`` is a call
into libm per element), sums reassociated (``fastmath`` without the flags that change NaN
or inf). The top-k selection is the one loop with branches (rarely taken ones).
float16 values are read and written as int16 bit patterns (numba has no float16 on the
CPU), float32 ones as int32.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_REASSOCIATE = {"reassoc", "contract", "nsz"}
_LOOP = {"cache": True, "nogil": True, "fastmath": _REASSOCIATE}
_INLINE = {"inline": "always", "fastmath": _REASSOCIATE}
_INF = np.float32(np.inf)
DONE, NOT_FINITE, BAD_CLASS = 0, 1, 2
"""What :func:`bucketed` returns."""


@njit(**_INLINE)
def exp32(x):
    """``e^x`` in float32 to within 2 ulp for ``−86 ≤ x ≤ 88``; exactly 0 below −86, so
    that nothing is ever subnormal (an arithmetic assist costs ~100 cycles on x86;
    ``e^−86 ≈ 4·10⁻³⁸``), and ``e^88`` above 88 (every caller either passes ``x ≤ 0`` or
    checks that the sum it builds stays below ``2¹⁰⁰``).

    ``e^x = 2^n · e^r`` with ``n = round(x·log₂e)`` and ``r = x − n·ln 2`` (ln 2 in two
    parts, so ``r`` is exact), ``e^r`` by the Cephes ``expf`` polynomial on
    ``|r| ≤ ln2/2``, ``2^n`` from its exponent bits.
    """
    below = x < np.float32(-86.0)
    x = min(max(x, np.float32(-86.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.442695041) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    scaled = p * np.uint32((np.int32(n) + 127) << 23).view(np.float32)
    return np.float32(0.0) if below else scaled


@njit(**_INLINE)
def log32(x):
    """``log x`` of one positive float32 (outside the vectorized loops: libm's, in float64)."""
    return np.float32(np.log(np.float64(x)))


@njit(**_INLINE)
def half_bits(x):
    """The float16 nearest to the float32 ``x`` (ties to even, like ``Tensor.half()``),
    as int16 bits; NaN stays a (quiet) NaN, overflow gives ±inf."""
    u = np.float32(x).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    exponent = np.int32((u >> np.uint32(23)) & np.uint32(0xFF)) - 112  # rebias 127 → 15
    mantissa = u & np.uint32(0x7FFFFF)
    if exponent == 143:
        bits = np.uint32(0x7C00) | (np.uint32(0x200) if mantissa else np.uint32(0))
    elif exponent >= 31:
        bits = np.uint32(0x7C00)
    elif exponent <= 0:  # a subnormal half, or zero
        if exponent < -10:
            bits = np.uint32(0)
        else:
            bits = _round_shift(mantissa | np.uint32(0x800000), np.uint32(14 - exponent))
    else:  # a carry out of the mantissa is the correct rounding into the next binade
        bits = (np.uint32(exponent) << np.uint32(10)) + _round_shift(mantissa, np.uint32(13))
    return np.uint16(sign | bits).view(np.int16)


@njit(**_INLINE)
def _round_shift(value, shift):
    """``value >> shift`` rounded to nearest, ties to even."""
    kept = value >> shift
    dropped = value & ((np.uint32(1) << shift) - np.uint32(1))
    halfway = np.uint32(1) << (shift - np.uint32(1))
    if dropped > halfway or (dropped == halfway and kept & np.uint32(1)):
        kept += np.uint32(1)
    return kept


@njit(**_INLINE)
def half_value(bits):
    """The float32 value of the float16 ``bits`` (int16)."""
    u = np.uint32(np.int16(bits).view(np.uint16))
    sign = (u & np.uint32(0x8000)) << np.uint32(16)
    exponent = (u >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = u & np.uint32(0x3FF)
    if exponent == 0:  # zero or subnormal: mantissa · 2⁻²⁴
        magnitude = np.float32(mantissa) * np.float32(2.0**-24)
        return -magnitude if sign else magnitude
    if exponent == 31:
        out = sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    else:
        out = sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    return np.uint32(out).view(np.float32)


@njit(**_INLINE)
def _insert(x, j, k, filled, top, where):
    """Insert ``(x, j)`` into the ``filled`` best of ``top``/``where`` (largest first,
    after equal values) unless ``k`` are filled and ``x`` is not above the smallest;
    returns the new count."""
    if filled == k and not x > top[k - 1]:
        return filled
    at = filled if filled < k else k - 1
    while at > 0 and x > top[at - 1]:
        top[at] = top[at - 1]
        where[at] = where[at - 1]
        at -= 1
    top[at] = x
    where[at] = j
    return filled + 1 if filled < k else filled


@njit(**_INLINE)
def _top_k(row, k, top, where, candidates):
    """The ``k`` largest of a row without NaN into ``top`` (largest first) and their
    positions into ``where``; of equal values the lower position first.

    Small ``k``: one pass, inserting what beats the ``k``-th best so far. Larger ``k``
    (where those insertions add up): the smallest of the maxima of ``k`` blocks of the
    row is a threshold that at least ``k`` values reach; one pass collects the positions
    that reach it (``candidates``, room for ``C``), and only those are inserted.
    """
    num_classes = row.shape[0]
    filled = 0
    if k < 16:
        for j in range(num_classes):
            filled = _insert(row[j], j, k, filled, top, where)
        return
    width = num_classes // k
    threshold = _INF
    for block in range(k):
        stop = num_classes if block == k - 1 else (block + 1) * width
        best = row[block * width]
        for j in range(block * width + 1, stop):
            best = row[j] if row[j] > best else best
        threshold = best if best < threshold else threshold
    found = 0
    for j in range(num_classes):
        if row[j] >= threshold:
            candidates[found] = j
            found += 1
    for c in range(found):
        filled = _insert(row[candidates[c]], candidates[c], k, filled, top, where)


@njit(**_INLINE)
def _exp_outside(row, scale, where, k, out):
    """``out_j = exp(row_j·scale − shift)`` for ``j`` not in ``where[:k]``, 0 for those;
    returns ``(Σ out, shift, check)``, ``check`` 0 iff the row is finite.

    The shift is 0 unless the sum leaves ``[2⁻⁶⁰, 2¹⁰⁰]`` (logits within ~40τ of 0, the
    usual case, need no pass for a maximum); then it is the maximum outside ``where``, so
    that the largest term is 1 and none that matters is subnormal.
    """
    check = _scale_outside(row, scale, where, k, out)
    if check != 0:
        return np.float32(np.nan), np.float32(0.0), check
    total = _exp_sum(out, np.float32(0.0))
    if np.float32(2.0**-60) <= total <= np.float32(2.0**100):
        return total, np.float32(0.0), check
    _scale_outside(row, scale, where, k, out)  # the exponentials replaced the scaled row
    shift = -_INF
    for j in range(row.shape[0]):
        shift = max(shift, out[j])
    return _exp_sum(out, shift), shift, check


@njit(**_INLINE)
def _scale_outside(row, scale, where, k, out):
    """``out_j = row_j·scale``, then ``−inf`` on ``where[:k]``; returns 0 iff the row is
    finite (``x·0`` is NaN for inf and NaN)."""
    check = np.float32(0.0)
    for j in range(row.shape[0]):
        out[j] = row[j] * scale
        check += out[j] * np.float32(0.0)
    for i in range(k):
        out[where[i]] = -_INF
    return check


@njit(**_INLINE)
def _exp_sum(values, shift):
    """``values_j ← exp(values_j − shift)`` in place; returns their sum."""
    total = np.float32(0.0)
    for j in range(values.shape[0]):
        e = exp32(values[j] - shift)
        values[j] = e
        total += e
    return total


@njit(**_LOOP)
def encode(z, values, half, classes, rest, inv_tau, overflow):
    """Per row of ``z``: the top ``k`` (bits, classes) and ``rest = log Σ_{j∉top}
    exp(z_j·inv_tau)``; ``rest = NaN`` where some ``|z_j| ≥ overflow`` or is NaN (top
    ``k``: the first ``k`` classes), ``−inf`` for the other rows when ``k = C``."""
    batch, num_classes = z.shape
    k = values.shape[1]
    top = np.empty(k, dtype=np.float32)
    where = np.empty(k, dtype=np.int64)
    scratch = np.empty(num_classes, dtype=np.float32)
    candidates = np.empty(num_classes, dtype=np.int64)
    for b in range(batch):
        row = z[b]
        outside = 0
        for j in range(num_classes):
            outside += not abs(row[j]) < overflow
        if outside:
            top[:] = row[:k]
            where[:] = np.arange(k)
        else:
            _top_k(row, k, top, where, candidates)
        for i in range(k):
            values[b, i] = half_bits(top[i]) if half else np.float32(top[i]).view(np.int32)
            classes[b, i] = where[i]
        if outside:
            rest[b, 0] = np.float32(np.nan)
        elif k == num_classes:
            rest[b, 0] = -_INF
        else:
            total, shift, _ = _exp_outside(row, inv_tau, where, k, scratch)
            rest[b, 0] = log32(total) + shift


@njit(**_LOOP)
def bucketed(z, top, half, index, rest, valid, masked, tau, scale, weight_tau, grad, value):
    """The bucketed term (``value[0]``) and its gradient (``grad``) over the batch, the
    arithmetic of :class:`flatmin.trajectory.kl._BucketedKL`. Returns ``DONE``;
    ``NOT_FINITE`` when a counted row of ``z`` holds inf or NaN (the caller then runs the
    eager code, which defines what such rows give); ``BAD_CLASS`` before anything is read
    through a class of a counted row outside ``[0, C)``."""
    batch, num_classes = z.shape
    k = index.shape[1]
    bucket = k < num_classes
    groups = k + 1 if bucket else k
    past = np.empty(groups, dtype=np.float32)
    present = np.empty(groups, dtype=np.float32)
    p = np.empty(groups, dtype=np.float32)
    q = np.empty(groups, dtype=np.float32)
    where = np.empty(k, dtype=np.int64)
    count = 0
    for b in range(batch):
        if not masked or valid[b]:
            count += 1
            for i in range(k):
                if not 0 <= index[b, i] < num_classes:
                    return BAD_CLASS
    count = max(count, 1)
    factor = weight_tau / np.float32(count)
    inv_tau = np.float32(1.0) / tau
    total_value = np.float32(0.0)
    for b in range(batch):
        out = grad[b]
        if masked and not valid[b]:
            out[:] = 0.0
            continue
        row = z[b]
        for i in range(k):
            stored = half_value(top[b, i]) if half else np.int32(top[b, i]).view(np.float32)
            where[i] = index[b, i]
            past[i] = stored * inv_tau
            present[i] = row[where[i]] * inv_tau
        mass = np.float32(1.0)
        if bucket:  # e_j outside T, kept in the gradient's row
            mass, shift, check = _exp_outside(row, inv_tau, where, k, out)
            if check != 0:
                return NOT_FINITE
            past[k] = rest[b, 0]
            present[k] = log32(mass) + shift
        else:
            check = np.float32(0.0)
            for i in range(k):
                check += present[i] * np.float32(0.0)
            if check != 0:
                return NOT_FINITE
        _log_softmax(past, p)
        _log_softmax(present, q)
        kl = np.float32(0.0)
        for g in range(groups):
            kl += p[g] * (past[g] - present[g])
            q[g] = (q[g] - p[g]) * factor  # the group's q − p, scaled
        total_value += kl
        if bucket:  # on j ∉ T: e_j·(Q − r)/Σe (0 on T, where e_j = 0)
            spread = q[k] / mass
            for j in range(num_classes):
                out[j] *= spread
        for i in range(k):
            out[where[i]] = q[i]
    value[0] = total_value * scale / np.float32(count)
    return DONE


@njit(**_INLINE)
def _log_softmax(logits, probs):
    """``logits ← logits − log Σ exp(logits)`` in place, and ``probs ← exp`` of that."""
    top = -_INF
    for g in range(logits.shape[0]):
        top = max(top, logits[g])
    total = np.float32(0.0)
    for g in range(logits.shape[0]):
        probs[g] = exp32(logits[g] - top)
        total += probs[g]
    norm = log32(total) + top
    for g in range(logits.shape[0]):
        logits[g] -= norm
        probs[g] /= total
