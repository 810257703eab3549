"""The checks SAF and MESA share: their settings, and a ``state_dict`` before restoring it."""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any


def require_keys(state: Mapping[str, Any], keys: Set[str], owner: str) -> None:
    """Raise a ValueError naming the missing keys unless ``state`` has all of ``keys``."""
    missing = keys - state.keys()
    if missing:
        raise ValueError(
            f"expected a {owner} state with keys {sorted(keys)}; missing {sorted(missing)}"
        )


def check_term_settings(lam: Any, tau: Any, start_epoch: Any) -> None:
    """Raise a ValueError unless ``λ ≥ 0``, ``τ > 0`` and ``start_epoch`` is an int."""
    if not lam >= 0:
        raise ValueError(f"expected lam >= 0, got {lam}")
    if not tau > 0:
        raise ValueError(f"expected tau > 0, got {tau}")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int):
        raise ValueError(f"expected an int start_epoch, got {start_epoch!r}")
