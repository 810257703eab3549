"""The few statistics the benchmarks report: mean ± std and paired t-intervals.

Runs of two methods that share a seed share their initial weights, data order and label
noise, so their accuracies are *paired*: the difference ``dᵢ = aᵢ − bᵢ`` per seed
removes the seed-to-seed variation both methods share. The benchmarks report

- ``mean ± std`` of each method over seeds (``std`` is the sample standard deviation,
  ``ddof = 1``);
- the paired difference to a baseline with its two-sided Student-t interval
  ``d̄ ± t_{(1+c)/2, n−1} · s_d / √n`` (Student, 1908; any statistics text, e.g.
  Wasserman, *All of Statistics*, §10), where ``s_d`` is the sample standard deviation
  of the differences and ``c`` the confidence (0.95).

The t quantile is computed here, from the regularized incomplete beta function
(continued fraction of Numerical Recipes §6.4, Lentz's method), so the benchmarks need
nothing beyond numpy: ``P(T ≤ t) = 1 − ½·I_{ν/(ν+t²)}(ν/2, ½)`` for ``t ≥ 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from flatmin.optim._checks import check_real

_TINY = 1e-300


def _betacf(a: float, b: float, x: float, max_iter: int = 300, eps: float = 1e-15) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0`` and ``0 ≤ x ≤ 1``."""
    check_real("a", a, minimum=0.0, exclusive_minimum=True)
    check_real("b", b, minimum=0.0, exclusive_minimum=True)
    check_real("x", x, minimum=0.0, maximum=1.0)
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df`` degrees of freedom."""
    check_real("df (degrees of freedom)", df, minimum=0.0, exclusive_minimum=True)
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_cdf` to an absolute error below 1e-10)."""
    check_real("p", p, minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True)
    check_real("df (degrees of freedom)", df, minimum=0.0, exclusive_minimum=True)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _check_values(values: Sequence[float], what: str, minimum: int) -> list[float]:
    if len(values) < minimum:
        raise ValueError(f"{what} needs at least {minimum} values, got {len(values)}")
    return [check_real(f"{what}'s values", v, hint="finite") for v in values]


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``ddof = 1``; 0 for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    """``mean ± std`` of ``values`` (at least one finite value)."""
    xs = _check_values(values, "summarize", 1)
    n = len(xs)
    mean = math.fsum(xs) / n
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return Summary(mean, math.sqrt(var), n)


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` over pairs: mean ``d̄``, std ``s_d`` and the two-sided interval
    ``[low, high] = d̄ ∓ t_{(1+c)/2, n−1}·s_d/√n`` at confidence ``c``."""

    mean: float
    std: float
    n: int
    low: float
    high: float
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """The interval lies strictly on one side of 0 (a difference at level ``c``)."""
        return self.low > 0 or self.high < 0

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        return (
            f"{self.mean * scale:+.{digits}f} "
            f"[{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"
        )


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> PairedDifference:
    """The paired difference ``a − b`` (``a[i]`` and ``b[i]`` share seed ``i``) and its
    Student-t interval; needs at least two pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    check_real("confidence", confidence, minimum=0.0, maximum=1.0, exclusive_minimum=True,
               exclusive_maximum=True)  # fmt: skip
    xs = _check_values(a, "paired_difference", 2)
    ys = _check_values(b, "paired_difference", 2)
    diff = summarize([x - y for x, y in zip(xs, ys, strict=True)])
    half = t_quantile(0.5 + confidence / 2.0, diff.n - 1) * diff.std / math.sqrt(diff.n)
    return PairedDifference(
        diff.mean, diff.std, diff.n, diff.mean - half, diff.mean + half, confidence
    )


def median(values: Sequence[float]) -> float:
    """The median (mean of the middle two for an even count)."""
    xs = sorted(_check_values(values, "median", 1))
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])
