"""Argument checks shared by every part of flatmin: one message style, in one place.

They live in the lowest layer (the optimizers' package) so that every package may import
them without an upward import.

Each check returns the value (as ``float`` or ``int`` where it says so) or raises: a
``TypeError`` for a value of the wrong kind, a ``ValueError`` for one out of range. The
message names the argument, says what was expected and shows what was given, e.g.
``rho must be a finite number >= 0 (e.g. 0.05), got nan``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")


def _range_text(minimum, maximum, exclusive_minimum, exclusive_maximum) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if exclusive_maximum else '<='} {maximum}")
    return " and ".join(parts)


def _expectation(kind: str, minimum, maximum, exclusive_minimum, exclusive_maximum, hint) -> str:
    text = kind
    bounds = _range_text(minimum, maximum, exclusive_minimum, exclusive_maximum)
    if bounds:
        text += " " + bounds
    if hint:
        text += f" ({hint})"
    return text


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    finite: bool = True,
    hint: str | None = None,
) -> float:
    """``value`` as a float if it is a real number (not a bool) within the bounds.

    NaN is always refused; infinities unless ``finite=False``.
    """
    kind = "a finite number" if finite else "a number"
    expected = _expectation(kind, minimum, maximum, exclusive_minimum, exclusive_maximum, hint)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    number = float(value)
    too_low = minimum is not None and (number <= minimum if exclusive_minimum else number < minimum)
    too_high = maximum is not None and (
        number >= maximum if exclusive_maximum else number > maximum
    )
    if math.isnan(number) or (finite and math.isinf(number)) or too_low or too_high:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hint: str | None = None,
) -> int:
    """``value`` if it is an integer (not a bool) within ``[minimum, maximum]``."""
    expected = _expectation("an integer", minimum, maximum, False, False, hint)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """``value`` if it is one of ``choices``; the message lists them."""
    if value not in choices or isinstance(value, bool) != any(
        isinstance(c, bool) and c == value for c in choices
    ):
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value
