"""The check MESA runs on a ``state_dict`` before restoring it."""

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
