"""Helpers shared by test packages: one bit-exact resume assertion for every stateful part."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch


def assert_trees_equal(mine: Any, theirs: Any, path: str = "state") -> None:
    """Assert two nested state trees are equal: tensors bit for bit (dtype and shape
    too), mappings key by key, sequences item by item, anything else by ``==``."""
    if isinstance(mine, torch.Tensor):
        assert isinstance(theirs, torch.Tensor), f"{path}: a tensor against {theirs!r}"
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, path
        assert torch.equal(mine, theirs), f"{path} differs"
    elif isinstance(mine, Mapping):
        assert isinstance(theirs, Mapping) and mine.keys() == theirs.keys(), path
        for key in mine:
            assert_trees_equal(mine[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(mine, (list, tuple)):
        assert isinstance(theirs, (list, tuple)) and len(mine) == len(theirs), path
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_trees_equal(a, b, f"{path}[{i}]")
    else:
        assert mine == theirs, f"{path}: {mine!r} != {theirs!r}"


def assert_resumes_bit_exactly(
    make: Callable[[int], Mapping[str, Any]],
    train: Callable[[Mapping[str, Any], range], None],
    *,
    epochs: int,
    stop_after: int,
    checkpoint: Path,
) -> Mapping[str, Any]:
    """Train ``epochs`` epochs straight, and ``stop_after`` epochs then a checkpoint on disk
    then the rest in parts built from another seed; assert every part ends bit-identical.

    ``make(seed)`` builds the stateful parts (name → object with ``state_dict`` and
    ``load_state_dict``: model, optimizer, loss terms); ``train(parts, epochs)`` runs the
    given epochs. Returns the straight run's parts for further checks.
    """
    straight = make(0)
    train(straight, range(epochs))
    first = make(0)
    train(first, range(stop_after))
    torch.save({name: part.state_dict() for name, part in first.items()}, checkpoint)
    resumed = make(1)  # another initialization: everything must come from the checkpoint
    state = torch.load(checkpoint)
    for name, part in resumed.items():
        part.load_state_dict(state[name])
    train(resumed, range(stop_after, epochs))
    for name in straight:
        assert_trees_equal(straight[name].state_dict(), resumed[name].state_dict(), name)
    return straight
