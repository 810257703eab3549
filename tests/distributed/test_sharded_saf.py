"""SAF's store sharded across processes (flatmin.distributed.sharded_saf).

The spawned processes (``sharded_saf_workers.sharded_store_run``) drive a ShardedSAF and the
replicated DistributedSAF through the same calls under a reshuffling DistributedSampler
(SAM's two passes per batch, read-only look-ups, rows too large for float16, samples
repeated inside one global batch); here the results are compared with each other and with
one SAF that sees the global batches. The single-process tests need no process group.
"""

from __future__ import annotations

import math

import pytest
import torch

from flatmin import SAF
from flatmin.distributed.sharded_checkpoint import load_sharded
from flatmin.distributed.sharded_saf import ShardedSAF, block_of
from tests.distributed.sharded_saf_workers import (
    STORE_CASES,
    STORE_CLASSES,
    STORE_EPOCHS,
    STORE_LAG,
    store_logits,
    store_order,
)
from tests.helpers import assert_trees_equal

SETTINGS = dict(lam=0.5, tau=2.0, lag_epochs=STORE_LAG, start_epoch=0)


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def world(request):
    """(number of processes, directory of their files)."""
    fixture = "fsdp_results" if request.param == 2 else "fsdp_results_4"
    return request.param, request.getfixturevalue(fixture)


def runs(world, case):
    size, out = world
    return [
        torch.load(out / f"sharded_store_{case}_{rank}.pt", weights_only=False)
        for rank in range(size)
    ]


def single_process_terms(size, case):
    """One SAF fed the global batches (the ranks' rows in rank order), call by call: the
    term after each call, computed directly from the targets it read."""
    samples, batch, top_k = STORE_CASES[case]
    saf = SAF(samples, STORE_CLASSES, **SETTINGS, top_k=top_k)
    terms = []
    for epoch in range(STORE_EPOCHS):
        saf.set_epoch(epoch)
        orders = [torch.tensor(store_order(samples, epoch, r, size)) for r in range(size)]
        for b in range(math.ceil(len(orders[0]) / batch)):
            parts = [order[b * batch : (b + 1) * batch] for order in orders]
            idx = torch.cat(parts)
            logits = torch.cat([store_logits(part, epoch) for part in parts])
            for record, rows in (
                (True, parts),
                (True, parts),
                (False, [p.flip(0) // 2 for p in parts]),
            ):
                values = torch.cat([store_logits(part, epoch) for part in rows])
                saf.lookup(values, torch.cat(rows), record)
                targets, valid = saf.lookup(logits, idx)  # another pass over the batch
                kl = saf.store.kl(logits, targets, SETTINGS["tau"], valid)
                terms.append(SETTINGS["lam"] * kl.item())
    return terms


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(STORE_CASES))
class TestAgainstTheReplicatedStore:
    def test_every_look_up_reads_the_same_rows_and_validity(self, world, case):
        repeats = valid_rows = 0
        for run in runs(world, case):
            for call in run["calls"]:
                (targets, valid, count), warned = call["sharded"]
                (expected, expected_valid, expected_count), expected_warned = call["replicated"]
                assert torch.equal(valid, expected_valid), call["epoch"]
                for part, expected_part in zip(targets, expected, strict=True):
                    assert torch.equal(part[valid], expected_part[valid])
                assert int(count) == int(expected_count) and warned == expected_warned
                repeats += len(set(call["indices"].tolist())) < len(call["indices"])
                valid_rows += int(valid.sum())
        warned = [m for run in runs(world, case) for c in run["calls"] for m in c["sharded"][1]]
        assert warned and all("were not finite in the store's dtype" in m for m in warned)
        assert repeats and valid_rows  # the cases exercise repeated samples and hits

    @pytest.mark.filterwarnings("ignore:SAF. .* not finite:RuntimeWarning")
    def test_the_term_is_the_single_process_term_on_the_global_batch(self, world, case):
        size, _ = world
        expected = single_process_terms(size, case)
        for store in ("sharded", "replicated"):
            per_rank = [
                [c[f"{store}_term"].item() for c in run["calls"]] for run in runs(world, case)
            ]
            for i, want in enumerate(expected):
                got = sum(rank[i] for rank in per_rank) / size
                assert got == pytest.approx(want, rel=1e-12, abs=1e-300), (store, i)
        assert any(t > 0 for t in expected)

    def test_each_process_holds_its_block_of_the_replicated_store(self, world, case):
        size, _ = world
        samples, _, top_k = STORE_CASES[case]
        # float16 rows; top 2: ⌈(4 + 2·(2 + 1))/4⌉·4 bytes
        row_bytes = STORE_CLASSES * 2 if top_k is None else 12
        per_sample = STORE_LAG * (row_bytes + 4)  # + the int32 epoch of each slot
        for rank, run in enumerate(runs(world, case)):
            low, high = run["bounds"]
            assert (low, high) == block_of(rank, samples, size)
            assert run["block"].keys() == run["replicated"].keys()
            for key, block in run["block"].items():
                assert torch.equal(block, run["replicated"][key][:, low:high])
            assert run["memory"] == (max(high - low, 1) * per_sample, samples * per_sample)

    @pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
    def test_a_sharded_checkpoint_loads_on_one_process(self, world, case):
        _, out = world
        samples, _, top_k = STORE_CASES[case]
        whole = ShardedSAF(samples, STORE_CLASSES, **SETTINGS, top_k=top_k)  # one process
        state = {"saf": whole.state_dict()}
        load_sharded(state, out / f"sharded_store_{case}")
        whole.load_state_dict(state["saf"])
        assert_trees_equal(whole.state_dict()["store"], runs(world, case)[0]["replicated"])
        assert whole.epoch == STORE_EPOCHS - 1


def test_blocks_split_the_samples_as_torch_chunk_does():
    for samples, processes in [(10, 4), (50, 4), (7, 2), (3, 4)]:
        chunks = torch.arange(samples).chunk(processes)
        for rank in range(processes):
            low, high = block_of(rank, samples, processes)
            expected = chunks[rank].tolist() if rank < len(chunks) else []
            assert list(range(low, high)) == expected


@pytest.mark.parametrize("top_k", [None, 2])
def test_on_one_process_it_is_saf(top_k):
    saf, sharded = SAF(12, 4, **SETTINGS, top_k=top_k), ShardedSAF(12, 4, **SETTINGS, top_k=top_k)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(4):
        saf.set_epoch(epoch)
        sharded.set_epoch(epoch)
        for idx in torch.randperm(12, generator=gen).split(5):
            logits = torch.randn(len(idx), 4, generator=gen, dtype=torch.float64)
            assert sharded(logits, idx).item() == pytest.approx(saf(logits, idx).item(), rel=1e-15)
    assert_trees_equal(sharded.state_dict(), saf.state_dict())
    assert sharded.memory_bytes == saf.memory_bytes


def test_from_saf_keeps_the_settings_and_the_contents():
    saf = SAF(6, 3, **SETTINGS)
    saf.set_epoch(1)
    saf(torch.randn(6, 3), torch.arange(6))
    sharded = ShardedSAF.from_saf(saf)
    assert_trees_equal(sharded.state_dict(), saf.state_dict())
    with pytest.raises(TypeError, match=r"expected a flatmin\.SAF"):
        ShardedSAF.from_saf(object())


def test_a_batch_outside_the_store_is_refused_before_anything_is_written():
    sharded = ShardedSAF(6, 3, **SETTINGS)
    before = sharded.state_dict()["store"]["written_epoch"].clone()
    with pytest.raises(ValueError, match=r"expected indices in \[0, 6\), got values in \[2, 6\]"):
        sharded(torch.randn(2, 3), torch.tensor([2, 6]))
    with pytest.raises(ValueError, match=r"expected logits of shape \(B, 3\)"):
        sharded(torch.randn(2, 4), torch.tensor([0, 1]))
    assert torch.equal(sharded.state_dict()["store"]["written_epoch"], before)
