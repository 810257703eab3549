"""The SAM family on FSDP2 (fully_shard) against one process stepping on the global batch.

The spawned processes (``fsdp_workers.py``) shard a float64 MLP over 2 (and 4) gloo
ranks and step through ``sam_step(perturbation="global")``; here every member runs on
one process with the whole batch. FSDP's reduce-scatter averages, so with equal shards
the two agree to float64 round-off — and a port that takes each rank's norm over its own
shards does not. Sharded checkpoints (``flatmin.distributed.sharded_checkpoint``) are
resumed by the session's second spawn, in new processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatmin.distributed import m_sharpness_step
from tests.distributed.fsdp_workers import (
    FAMILY,
    GLOBAL_BATCH,
    HSDP_FAMILY,
    M_LOCAL,
    RESUMED,
    STEPS,
    closure_for,
    family_data,
    mlp,
)
from tests.helpers import assert_trees_equal

pytestmark = pytest.mark.distributed
TOLERANCE = 1e-12  # float64; the runs differ by round-off of at most ~1e-15


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def world(request):
    """(number of processes, directory of their files)."""
    fixture = "fsdp_results" if request.param == 2 else "fsdp_results_4"
    return request.param, request.getfixturevalue(fixture)


def load(world, name):
    size, out = world
    return [torch.load(out / f"{name}_{rank}.pt", weights_only=False) for rank in range(size)]


@pytest.fixture(scope="module")
def references():
    """Each member's weights after every step on one process with the whole batch."""
    xs, ys = family_data()
    runs = {}
    for name, make in FAMILY.items():
        model = mlp()
        opt = make(model.parameters())
        runs[name] = []
        for step in range(STEPS):
            opt.zero_grad()
            opt.step(closure_for(opt, model, xs[step], ys[step]), model=model)
            runs[name].append([p.detach().clone() for p in model.parameters()])
    return runs


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_member_on_shards_equals_one_process_on_the_global_batch(world, references, name):
    for rank, run in enumerate(load(world, "fsdp_family")):
        for step in range(STEPS):
            difference = max_difference(run[name]["weights"][step], references[name][step])
            assert difference < TOLERANCE, (name, rank, step, difference)


@pytest.mark.slow
def test_hsdp_replicating_and_sharding_equals_one_process_too(fsdp_results_4, references):
    """A 2 x 2 mesh (replicate, shard): a norm reduced over every process would count each
    shard twice."""
    for rank in range(4):
        run = torch.load(fsdp_results_4 / f"fsdp_family_{rank}.pt", weights_only=False)
        for name in HSDP_FAMILY:
            difference = max_difference(run["hsdp"][name], references[name][-1])
            assert difference < TOLERANCE, (name, rank, difference)


def test_the_shards_are_uneven_and_on_four_processes_one_is_empty(world):
    size, _ = world
    local_rows = [run["sam_sgd"]["local_rows"] for run in load(world, "fsdp_family")]
    # weights and biases of Linear(6, 10), Linear(10, 16), Linear(16, 3), dim 0 split
    for full_rows, shards in zip([10, 10, 16, 16, 3, 3], zip(*local_rows)):
        assert sum(shards) == full_rows
    if size == 4:
        assert local_rows[3][4] == 0  # rank 3 holds none of the last layer's 3 rows


@pytest.mark.parametrize("name", list(FAMILY))
def test_the_base_optimizer_state_stays_sharded(world, name):
    for run in load(world, "fsdp_family"):
        sharded = run[name]["shaped_state_is_sharded"]
        assert sharded and all(sharded), name
    if name.startswith("looksam"):
        assert "g_v" in run[name]["state_keys"]  # LookSAM's own direction, sharded too


def test_each_norm_costs_one_scalar_all_reduce_and_no_gather(world):
    for run in load(world, "fsdp_family"):
        seen = run["collectives"]
        assert seen["sam.first_step"] == [("gloo:all_reduce", [[]])]  # ‖g‖²
        assert seen["sam.second_step"] == []
        assert seen["stablesam.first_step"] == [("gloo:all_reduce", [[]])]
        assert seen["stablesam.second_step"] == [("gloo:all_reduce", [[]])]  # ‖g_s‖² for γ
        assert seen["gsam.first_step"] == [("gloo:all_reduce", [[]])]
        assert seen["gsam.second_step"] == [("gloo:all_reduce", [[2]])]  # ⟨g,g_s⟩, ‖g_s‖²
        assert seen["looksam.first_step"] == [("gloo:all_reduce", [[]])]
        # ⟨g,g_s⟩, then ‖g_v‖² of g_v = g_s − (⟨g,g_s⟩/‖g‖²)·g, which needs the first
        assert seen["looksam.second_step"] == [("gloo:all_reduce", [[]])] * 2


def test_a_norm_over_each_rank_own_shards_would_fail_these_tests(world, references):
    # the same SAM+SGD steps with each rank's ‖g‖ over its local shards only
    for run in load(world, "fsdp_naive"):
        assert max_difference(run, references["sam_sgd"][-1]) > 1e-4


def test_m_sharpness_step_on_shards_is_m_sharpness_over_every_process_sub_batch(world):
    size, _ = world
    per_rank = GLOBAL_BATCH // size
    # sub-batch k of the sharded step: the k-th M_LOCAL rows of every rank, together
    order = torch.cat([
        torch.arange(r * per_rank + k * M_LOCAL, r * per_rank + (k + 1) * M_LOCAL)
        for k in range(per_rank // M_LOCAL)
        for r in range(size)
    ])  # fmt: skip
    model = mlp()
    opt = FAMILY["sam_sgd"](model.parameters())
    xs, ys = family_data()
    for step in range(STEPS):
        m_sharpness_step(opt, model, F.cross_entropy, xs[step][order], ys[step][order],
                         m=size * M_LOCAL)  # fmt: skip
    for run in load(world, "fsdp_m_sharpness"):
        assert max_difference(run, list(model.parameters())) < TOLERANCE


def test_per_process_perturbation_is_refused_with_the_reason(world):
    for run in load(world, "fsdp_refusal"):
        assert "perturbation='local' (per-process ε) needs each process's own" in run["message"]
        assert "perturbation='global'" in run["message"] and "m_sharpness_step" in run["message"]
        assert run["unchanged"]


def test_rows_of_every_rank_are_gathered_in_rank_order_with_uneven_counts(world):
    size, _ = world
    expected = torch.cat([
        torch.arange(r + 1, dtype=torch.float64)[:, None] + torch.tensor([[0.0, 0.5]]) * r
        for r in range(size)
    ])  # fmt: skip
    for rank, (gathered, offset) in enumerate(load(world, "fsdp_gather_rows")):
        assert torch.equal(gathered, expected)
        assert offset == rank * (rank + 1) // 2


def test_a_sharded_checkpoint_resumes_bit_exactly_in_new_processes(fsdp_resumed):
    for name in RESUMED:
        for rank in range(2):
            straight = torch.load(fsdp_resumed / f"dcp_straight_{name}_{rank}.pt")
            resumed = torch.load(fsdp_resumed / f"dcp_resumed_{name}_{rank}.pt")
            assert_trees_equal(resumed, straight, name)  # weights and optimizer state
