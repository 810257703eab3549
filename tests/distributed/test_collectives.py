"""Collectives on a single process (no process group): identities and input checks.

Their behaviour across processes is checked by the two-process tests of this directory.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatmin.distributed.collectives import (
    all_gather_rows,
    average_gradients,
    max_replica_difference,
    norm_statistics,
    reduce_metrics,
    sync_norm_statistics,
)


def test_reduce_metrics_on_one_process_returns_the_values_as_floats():
    reduced = reduce_metrics({"loss": torch.tensor(0.25), "acc": 1, "n": 3.5})
    assert reduced == {"acc": 1.0, "loss": 0.25, "n": 3.5}
    assert all(type(v) is float for v in reduced.values())


@pytest.mark.parametrize(
    ("metrics", "op", "error", "match"),
    [
        ({"loss": torch.ones(2)}, "mean", ValueError, "scalar"),
        ({"loss": "high"}, "mean", TypeError, "number"),
        ({"flag": True}, "mean", TypeError, "number"),
        ({"loss": 1.0}, "max", ValueError, "'mean' or 'sum'"),
    ],
)
def test_reduce_metrics_rejects_what_is_not_a_scalar(metrics, op, error, match):
    with pytest.raises(error, match=match):
        reduce_metrics(metrics, op=op)


def test_norm_statistics_are_the_running_means_and_variances():
    model = nn.Sequential(
        nn.Linear(2, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)
    )
    stats = norm_statistics(model)
    assert len(stats) == 2
    assert stats[0] is model[1].running_mean and stats[1] is model[1].running_var


def test_single_process_collectives_change_nothing():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model(torch.randn(4, 2)).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    average_gradients(model.parameters())
    for how in ("mean", "broadcast", "none"):
        sync_norm_statistics(model, how)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert max_replica_difference(list(model.parameters())) == 0.0


def test_sync_norm_statistics_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="'mean', 'broadcast', 'none'"):
        sync_norm_statistics(nn.BatchNorm1d(2), "median")


def test_average_gradients_rejects_sparse_gradients():
    embedding = nn.Embedding(5, 2, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="dense"):
        average_gradients(embedding.parameters())


def test_all_gather_rows_on_one_process_is_the_tensor_at_offset_zero():
    rows = torch.arange(6.0).reshape(3, 2)
    gathered, offset = all_gather_rows(rows)
    assert gathered is rows and offset == 0
