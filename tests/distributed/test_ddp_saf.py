"""SAF with a replicated store under DistributedSampler reshuffling (flatmin.distributed.saf).

Two gloo processes record everything once (module fixture); the tests rebuild the
samplers' orders here and check every look-up and the training run against a single
process that sees the same global batches.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatmin import SAF
from flatmin.distributed.saf import DistributedSAF
from tests.distributed.saf_workers import (
    SAF_EPOCHS,
    SAF_LAG,
    SAF_RANK_BATCH,
    SAF_SAMPLES,
    SAF_TRAIN_EPOCHS,
    SAF_TRAIN_SAMPLES,
    rank_order,
    saf_data,
    saf_model,
    synthetic_logits,
)

pytestmark = pytest.mark.distributed
WORLD = 2


@pytest.fixture(scope="module")
def runs(ddp_results):
    out = ddp_results
    return {
        name: [torch.load(out / f"{name}_{r}.pt") for r in range(WORLD)]
        for name in ("saf_lookup", "saf_train", "saf_train_top1", "saf_warnings")
    }


def test_sampler_moves_samples_across_processes():
    first = set(rank_order(SAF_SAMPLES, 0, 0, WORLD))
    later = set(rank_order(SAF_SAMPLES, SAF_LAG, 0, WORLD))
    assert first != later


def test_every_lookup_returns_the_logits_of_exactly_lag_epochs_before(runs):
    for run in runs["saf_lookup"]:
        assert len(run["lookups"]) == SAF_EPOCHS * SAF_SAMPLES // WORLD // SAF_RANK_BATCH
        for epoch, idx, targets, valid, count, _ in run["lookups"]:
            if epoch < SAF_LAG:
                assert not valid.any()
                continue
            assert valid.all(), (epoch, idx)
            assert int(count) == WORLD * SAF_RANK_BATCH
            expected = synthetic_logits(idx, epoch - SAF_LAG).to(torch.float16)
            assert torch.equal(targets[0], expected), (epoch, idx)


def test_per_process_stores_miss_most_lookups(runs):
    """The official layout: a store per process, under the same reshuffling. A row hits
    exactly when the same process saw the sample ``lag`` epochs earlier."""
    misses = total = 0
    for rank, run in enumerate(runs["saf_lookup"]):
        for epoch, idx, *_, own_valid in run["lookups"]:
            if epoch < SAF_LAG:
                continue
            seen_then = set(rank_order(SAF_SAMPLES, epoch - SAF_LAG, rank, WORLD))
            assert own_valid.tolist() == [i in seen_then for i in idx.tolist()], (rank, epoch)
            misses += int((~own_valid).sum())
            total += len(idx)
    assert (misses, total) == (30, 60)  # half of the look-ups find no target at all


def test_stores_are_identical_on_every_process(runs):
    rank0, rank1 = (run["store"] for run in runs["saf_lookup"])
    for key in ("logits", "written_epoch"):
        assert torch.equal(rank0["store"][key], rank1["store"][key])


def test_batches_of_different_sizes_are_all_recorded(runs):
    rank0, rank1 = (run["store"]["store"] for run in runs["saf_lookup"])
    slot = SAF_EPOCHS % SAF_LAG
    assert torch.equal(
        rank0["written_epoch"][slot, :5], torch.full((5,), SAF_EPOCHS, dtype=torch.int32)
    )
    expected = synthetic_logits(torch.arange(5), SAF_EPOCHS).to(torch.float16)
    assert torch.equal(rank1["logits"][slot, :5], expected)
    targets, valid, _ = runs["saf_lookup"][1]["uneven"]
    assert targets[0].shape == (2, 3) and valid.shape == (2,)


def test_processes_at_different_epochs_are_refused_on_every_process(runs):
    for run in runs["saf_lookup"]:
        message, unchanged = run["epoch_error"]
        assert message is not None and "set_epoch" in message
        assert unchanged


def single_process_run(top_k=None):
    """The same global batches (rank 0's rows, then rank 1's) on one process."""
    model = saf_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    saf = SAF(SAF_TRAIN_SAMPLES, 3, lam=1.0, tau=2.0, lag_epochs=1, start_epoch=0, top_k=top_k)
    xs, ys = saf_data()
    terms = []
    for epoch in range(SAF_TRAIN_EPOCHS):
        saf.set_epoch(epoch)
        orders = [
            torch.tensor(rank_order(SAF_TRAIN_SAMPLES, epoch, r, WORLD)) for r in range(WORLD)
        ]
        for parts in zip(*(o.split(SAF_RANK_BATCH) for o in orders)):
            idx = torch.cat(parts)
            logits = model(xs[idx])
            term = saf(logits, idx)
            # DDP averages per-process means of the cross entropy over equal shards.
            ce = torch.stack(
                [F.cross_entropy(lo, ys[p]) for lo, p in zip(logits.split(SAF_RANK_BATCH), parts)]
            ).mean()
            opt.zero_grad()
            (ce + term).backward()
            opt.step()
            terms.append(float(term.detach()))
    return model.state_dict(), terms, saf


def test_two_process_saf_equals_one_process_on_the_same_global_batches(runs):
    state, terms, _ = single_process_run()
    assert max(terms) > 0  # the term was active and mattered
    for run in runs["saf_train"]:
        for key in state:
            torch.testing.assert_close(run["state"][key], state[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            torch.tensor(run["terms"]), torch.tensor(terms), rtol=1e-5, atol=1e-7
        )
    assert all(
        torch.equal(runs["saf_train"][0]["state"][k], runs["saf_train"][1]["state"][k])
        for k in state
    )


def test_two_process_top_k_saf_equals_one_process_and_keeps_one_store(runs):
    """The replicated store with compressed rows: each process encodes its rows, the
    encoded rows are gathered, every copy of the store is the same byte for byte."""
    state, terms, saf = single_process_run(top_k=1)
    full_terms = single_process_run()[1]
    assert max(terms) > 0 and terms != full_terms  # the bucket changed the term
    rank0, rank1 = runs["saf_train_top1"]
    for run in (rank0, rank1):
        for key in state:
            # float32 rounding of two orders of summation (DDP's average, the share's
            # rescale), carried through the training steps: ~1e-6 of the weights' scale
            torch.testing.assert_close(run["state"][key], state[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(run["terms"]), torch.tensor(terms), rtol=1e-5, atol=1e-7
        )
    for key in ("rows", "written_epoch"):
        assert torch.equal(rank0["store"][key], rank1["store"][key])
    assert torch.equal(rank0["store"]["written_epoch"], saf.store.written_epoch)
    values, classes, rest = saf.store.unpack((rank0["store"]["rows"],))
    assert torch.equal(classes, saf.store.classes)  # the same top class of every row
    torch.testing.assert_close(values, saf.store.values, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rest, saf.store.rest_lse, rtol=1e-4, atol=1e-5)


def test_single_process_wrapper_is_plain_saf():
    logits = torch.randn(4, 3, requires_grad=True)
    idx = torch.tensor([0, 1, 2, 3])
    plain, wrapped = (
        SAF(4, 3, lag_epochs=1, start_epoch=0),
        DistributedSAF(SAF(4, 3, lag_epochs=1, start_epoch=0)),
    )
    for epoch in range(2):
        plain.set_epoch(epoch)
        wrapped.set_epoch(epoch)
        current = logits * (epoch + 1)
        assert torch.equal(plain(current, idx), wrapped(current, idx))


def test_rejects_what_is_not_a_saf_and_bad_batches():
    with pytest.raises(TypeError, match=r"flatmin\.SAF"):
        DistributedSAF(object())
    wrapped = DistributedSAF(SAF(4, 3))
    before = wrapped.state_dict()["store"]["written_epoch"].clone()
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        wrapped(torch.randn(2, 5), torch.tensor([0, 1]))
    assert torch.equal(wrapped.state_dict()["store"]["written_epoch"], before)


def test_every_process_warns_from_the_wrapped_saf_and_only_when_something_is_wrong(runs):
    for caught in runs["saf_warnings"]:
        assert caught["with_set_epoch"] == []  # padded epochs (8 rows for 7 samples) are fine
        # Rank 1's NaN row is part of the global batch that both processes record.
        assert len(caught["non_finite"]) == 1
        assert caught["non_finite"][0].startswith("SAF: 1 logit row(s) were not finite")
        # Epochs 4-6 without set_epoch: 16 rows reach 2 x 7 in the second of them, once.
        assert len(caught["forgotten"]) == 1
        assert caught["forgotten"][0].startswith("SAF: 16 rows were recorded in epoch 3")
        assert "saf.set_epoch(epoch)" in caught["forgotten"][0]


def test_single_process_wrapper_warns_for_non_finite_rows_and_a_forgotten_set_epoch():
    wrapped = DistributedSAF(SAF(4, 3, lag_epochs=1))
    logits = torch.randn(4, 3)
    logits[2, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"1 logit row\(s\) were not finite"):
        wrapped(logits, torch.arange(4))
    with pytest.warns(RuntimeWarning, match=r"8 rows were recorded in epoch 0.*set_epoch"):
        wrapped(torch.randn(4, 3), torch.arange(4).flip(0))  # a new batch, not another pass
