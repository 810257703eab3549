"""Data forms, batch-size weighting and sub-batching of the measure data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatmin.measure.batches import (
    collect_batches,
    loss_and_gradient,
    mean_loss,
    num_samples,
    split_batches,
)
from tests.measure.helpers import make_data, make_mlp


def test_single_batch_list_of_batches_and_dataloader():
    x, y = make_data(10)
    assert len(collect_batches((x, y))) == 1
    assert len(collect_batches([x, y])) == 1  # a list of two tensors is one batch too
    assert len(collect_batches([(x[:4], y[:4]), (x[4:], y[4:])])) == 2
    index = torch.arange(10)
    loader = DataLoader(TensorDataset(x, y, index), batch_size=3)  # extra items ignored
    batches = collect_batches(loader)
    assert [b.size for b in batches] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([b.x for b in batches]), x)


def test_max_batches_stops_early():
    x, y = make_data(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    batches = collect_batches(loader, max_batches=2)
    assert num_samples(batches) == 6


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (torch.zeros(3), TypeError),
        ([], ValueError),
        ([(torch.zeros(3, 2),)], TypeError),
        ([(torch.zeros(3, 2), torch.zeros(4))], ValueError),
        ([(torch.zeros(3, 2), [0, 1, 2])], TypeError),
    ],
)
def test_bad_data_is_rejected(data, error):
    with pytest.raises(error):
        collect_batches(data)


def test_bad_max_batches_is_rejected():
    with pytest.raises(ValueError, match="max_batches"):
        collect_batches(make_data(4), max_batches=0)


def test_mean_loss_is_weighted_by_batch_size():
    model = make_mlp(batch_norm=False)
    x, y = make_data(10)
    batches = collect_batches([(x[:7], y[:7]), (x[7:], y[7:])])
    expected = F.cross_entropy(model(x), y)
    torch.testing.assert_close(
        mean_loss(model, F.cross_entropy, batches), expected, rtol=1e-14, atol=0
    )


def test_loss_and_gradient_match_full_batch_autograd_and_leave_grad_alone():
    model = make_mlp(batch_norm=False)
    x, y = make_data(10)
    params = list(model.parameters())
    batches = collect_batches([(x[:3], y[:3]), (x[3:], y[3:])])
    loss, grads = loss_and_gradient(model, F.cross_entropy, batches, params)
    assert all(p.grad is None for p in params)
    full = F.cross_entropy(model(x), y)
    expected = torch.autograd.grad(full, params)
    torch.testing.assert_close(loss, full.detach(), rtol=1e-14, atol=0)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


def test_split_batches_cuts_disjoint_sub_batches():
    x, y = make_data(10)
    parts = split_batches(collect_batches([(x[:7], y[:7]), (x[7:], y[7:])]), 3)
    assert [p.size for p in parts] == [3, 3, 1, 3]
    assert torch.equal(torch.cat([p.x for p in parts]), x)
    with pytest.raises(ValueError, match="m must be an integer >= 1"):
        split_batches(parts, 0)


def test_loss_fn_must_return_a_scalar():
    model = make_mlp(batch_norm=False)
    batches = collect_batches(make_data(4))
    with pytest.raises(ValueError, match="scalar"):
        mean_loss(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), batches)
