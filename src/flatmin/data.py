"""Dataset helpers for the trajectory losses."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, IterableDataset


class WithIndex(Dataset):
    """Wrap a map-style dataset so each item also carries its index: ``(input, target, index)``.

    SAF stores logits per sample, so its training loop needs each sample's dataset index:

    .. test: setup=sgd

    ::

        from torch.utils.data import DataLoader

        saf = SAF(num_samples=len(train_set), num_classes=10)
        loader = DataLoader(WithIndex(train_set), batch_size=128, shuffle=True)
        for x, y, idx in loader:
            loss = F.cross_entropy(logits := model(x), y) + saf(logits, idx)

    An item that is a tuple or list is extended with the index (``(x, y)`` becomes
    ``(x, y, index)``); any other item ``v`` becomes ``(v, index)``. The default collate
    function turns the indices into an int64 tensor of shape ``(B,)``.
    """

    def __init__(self, dataset: Any) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "expected a map-style dataset (with __getitem__ and __len__); an "
                "IterableDataset has no stable sample indices"
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                "expected a map-style dataset with __getitem__ and __len__, got "
                f"{type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return _with_index(self.dataset[index], index)

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, ...]]:
        """A whole batch at once when the wrapped dataset can fetch one, so the DataLoader
        keeps its batched fetch instead of falling back to one item at a time."""
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [_with_index(item, i) for item, i in zip(items, indices)]


def _with_index(item: Any, index: int) -> tuple[Any, ...]:
    if isinstance(item, (tuple, list)):
        return (*item, index)
    return (item, index)
