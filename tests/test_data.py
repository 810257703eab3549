import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from flatmin.data import WithIndex


def test_yields_input_target_and_index():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    data = WithIndex(TensorDataset(x, y))
    assert len(data) == 10
    item = data[7]
    assert torch.equal(item[0], x[7]) and item[1] == y[7] and item[2] == 7


def test_loader_collates_indices_to_an_int64_tensor_matching_the_samples():
    x = torch.arange(12.0).view(12, 1)
    loader = DataLoader(WithIndex(TensorDataset(x, x.squeeze(1))), batch_size=5, shuffle=True)
    seen = []
    for inputs, _targets, idx in loader:
        assert idx.dtype == torch.int64 and idx.shape == (len(inputs),)
        assert torch.equal(inputs.squeeze(1), idx.double().float())
        seen += idx.tolist()
    assert sorted(seen) == list(range(12))


def test_non_tuple_items_become_pairs():
    assert WithIndex(["a", "b"])[1] == ("b", 1)


def test_iterable_datasets_are_rejected():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match="map-style"):
        WithIndex(Stream())
    with pytest.raises(TypeError, match="map-style"):
        WithIndex(42)


def test_batched_fetch_equals_item_by_item():
    class Batched(TensorDataset):
        def __init__(self, *tensors):
            super().__init__(*tensors)
            self.batched_calls = 0

        def __getitems__(self, indices):
            self.batched_calls += 1
            return [self[i] for i in indices]

    x, y = torch.randn(9, 2), torch.arange(9)
    base = Batched(x, y)
    data = WithIndex(base)
    indices = [4, 0, 8, 4]
    batch = data.__getitems__(indices)
    assert base.batched_calls == 1
    for (xb, yb, ib), i in zip(batch, indices):
        xi, yi, ii = data[i]
        assert torch.equal(xb, xi) and yb == yi and ib == ii == i
    assert WithIndex(TensorDataset(x, y)).__getitems__([2, 3])[1][2] == 3
    loader = DataLoader(data, batch_size=4, shuffle=False)
    xs, _, idx = next(iter(loader))
    assert torch.equal(xs, x[:4]) and torch.equal(idx, torch.arange(4))
