"""SAM under DDP (flatmin.distributed.sam) and its single-process twin (m_sharpness).

Two real gloo processes on the CPU run every scenario once (module fixture); the tests
compare what they recorded with gradients and steps computed here independently.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from flatmin import ESAM, GSAM, SAM, LookSAM, StableSAM
from flatmin.distributed import first_pass, m_sharpness_step, sam_step
from tests.distributed.ddp_workers import (
    ESAM_BETA,
    ESAM_GAMMA,
    ESAM_RHO,
    ESAM_STEPS,
    FAMILY_LOCAL_STEPS,
    GLOBAL_BATCH,
    LOOKSAM_K,
    STEPS,
    make_data,
    make_model,
    shard,
)

pytestmark = pytest.mark.distributed
WORLD = 2


@pytest.fixture(scope="module")
def runs(ddp_results):
    out = ddp_results
    load = lambda name: [torch.load(out / f"{name}_{r}.pt") for r in range(WORLD)]  # noqa: E731
    return {
        "local": load("sam_local_0"),
        "global": load("sam_global_0"),
        "global_stable": load("sam_global_1"),
        "sam_step": load("sam_step"),
        "nonfinite": load("sam_nonfinite"),
        "family_global": load("sam_family_global"),
        "family_local": load("sam_family_local"),
        "esam_local": load("esam_local"),
    }


def gradient_at_init(x, y):
    model = make_model()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def m_sharpness_run(m, optimizer=SAM):
    model = make_model()
    opt = optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    xs, ys = make_data()
    for step in range(STEPS):
        m_sharpness_step(opt, model, F.cross_entropy, xs[step], ys[step], m=m)
    return model.state_dict()


def assert_states(a, b, exact):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_local_first_pass_uses_each_process_own_gradient(runs):
    xs, ys = make_data()
    for rank, run in enumerate(runs["local"]):
        expected = gradient_at_init(shard(xs[0], rank, WORLD), shard(ys[0], rank, WORLD))
        torch.testing.assert_close(run["first_grads"][0], expected)
    for step in range(STEPS):
        assert not torch.allclose(
            runs["local"][0]["first_grads"][step], runs["local"][1]["first_grads"][step]
        )
    perturbed = [torch.cat([p.reshape(-1) for p in r["perturbed_last"]]) for r in runs["local"]]
    assert not torch.allclose(*perturbed)


def test_local_replicas_stay_identical(runs):
    rank0, rank1 = runs["local"]
    assert_states(rank0["state"], rank1["state"], exact=True)
    assert int(rank0["state"]["1.num_batches_tracked"]) == STEPS  # statistics moved once per step


def test_two_processes_equal_one_process_m_sharpness(runs):
    expected = m_sharpness_run(m=GLOBAL_BATCH // WORLD)
    assert_states(runs["local"][0]["state"], expected, exact=False)


def test_global_first_pass_is_the_averaged_gradient(runs):
    xs, ys = make_data()
    shards = [
        gradient_at_init(shard(xs[0], r, WORLD), shard(ys[0], r, WORLD)) for r in range(WORLD)
    ]
    expected = torch.stack(shards).mean(dim=0)
    for run in runs["global"]:
        torch.testing.assert_close(run["first_grads"][0], expected)
    for step in range(STEPS):
        assert torch.equal(
            runs["global"][0]["first_grads"][step], runs["global"][1]["first_grads"][step]
        )
    perturbed = [torch.cat([p.reshape(-1) for p in r["perturbed_last"]]) for r in runs["global"]]
    assert torch.equal(*perturbed)
    assert_states(runs["global"][0]["state"], runs["global"][1]["state"], exact=True)


def test_global_stable_sam_replicas_stay_identical(runs):
    rank0, rank1 = runs["global_stable"]
    assert_states(rank0["state"], rank1["state"], exact=True)
    assert not torch.equal(rank0["state"]["0.weight"], runs["global"][0]["state"]["0.weight"])


def test_sam_step_helper_on_ddp_and_on_a_plain_module(runs):
    rank0, rank1 = runs["sam_step"]
    expected = m_sharpness_run(m=GLOBAL_BATCH // WORLD)
    for run in (rank0, rank1):
        assert_states(run["ddp"], expected, exact=False)
        assert_states(run["plain"], expected, exact=False)
        assert run["replica_difference_True"] == 0.0
        assert run["replica_difference_False"] == 0.0
    assert_states(rank0["ddp"], rank1["ddp"], exact=True)


def test_a_nonfinite_first_pass_on_one_process_skips_the_step_on_every_process(runs):
    rank0, rank1 = runs["nonfinite"]
    assert torch.isfinite(rank0[1]).all()
    assert torch.equal(rank0[1], rank0[0])  # rank 0's own gradient was finite: skipped anyway
    assert torch.equal(rank0[1], rank1[1])


def test_reduce_metrics_averages_and_sums_across_processes(runs):
    rank0, rank1 = runs["sam_step"]
    assert rank0["metrics"] == rank1["metrics"]
    assert rank0["metrics"]["rank"] == 0.5
    assert rank0["metrics"]["count"] == 1.0
    assert rank0["metrics_sum"] == {"rank": 1.0}


UNSAFE_PER_PROCESS = {
    "stablesam": lambda params: StableSAM(params, torch.optim.SGD, rho=0.05, lr=0.1),
    "gsam": lambda params: GSAM(params, torch.optim.SGD, rho=0.05, lr=0.1),
    "looksam": lambda params: LookSAM(params, torch.optim.SGD, rho=0.05, lr=0.1),
}


class UnknownGSAM(GSAM):
    """A subclass flatmin knows nothing about: it inherits GSAM's traits."""


@pytest.mark.parametrize("name", sorted(UNSAFE_PER_PROCESS))
def test_m_sharpness_refuses_updates_that_use_g_and_changes_nothing(name):
    model = make_model()
    opt = UNSAFE_PER_PROCESS[name](model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = make_data()
    with pytest.raises(ValueError, match=r"uses the first-pass gradient .*uses_clean_gradient"):
        m_sharpness_step(opt, model, F.cross_entropy, xs[0], ys[0], m=4)
    assert_states(model.state_dict(), before, exact=True)
    assert all(p.grad is None for p in model.parameters())


class TwoPassWithoutTraits:
    """The two-pass interface of an earlier flatmin, without the traits sam_step reads."""

    is_perturbed = False

    def first_step(self, zero_grad=False): ...

    def second_step(self, zero_grad=False): ...

    def restore_weights(self): ...

    def abandon_step(self): ...


def test_sam_step_refuses_an_optimizer_without_the_traits_and_changes_nothing():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = make_data()
    with pytest.raises(TypeError, match=r"lacks run_first_pass, .*uses_clean_gradient"):
        sam_step(TwoPassWithoutTraits(), model, lambda: F.cross_entropy(model(xs[0]), ys[0]))
    assert_states(model.state_dict(), before, exact=True)
    assert all(p.grad is None for p in model.parameters())


def test_esam_is_accepted_with_per_process_epsilon():
    model = make_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    xs, ys = make_data()
    with pytest.warns(UserWarning, match="per-sample losses"):
        sam_step(opt, model, lambda: F.cross_entropy(model(xs[0]), ys[0]).backward())
    assert opt.steps_done == 1


def test_gsam_and_looksam_with_the_averaged_gradient_stay_identical(runs):
    rank0, rank1 = runs["family_global"]
    for name in rank0:
        assert_states(rank0[name], rank1[name], exact=True)


def test_sam_step_runs_looksam_reuse_steps_with_one_pass():
    xs, ys = make_data(steps=5)
    models = [make_model(), make_model()]
    opts = [LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=2, lr=0.1) for m in models]
    passes = []
    for step in range(5):

        def closure(model, step=step):
            passes.append(step)
            loss = F.cross_entropy(model(xs[step]), ys[step])
            loss.backward()
            return loss

        opts[0].zero_grad()
        opts[0].step(lambda: closure(models[0]), model=models[0])
        sam_step(opts[1], models[1], lambda: closure(models[1]), perturbation="global")
    assert_states(models[0].state_dict(), models[1].state_dict(), exact=True)
    assert len(passes) == 2 * (2 + 1 + 2 + 1 + 2)  # k = 2: steps 1 and 3 reuse, one pass each


@pytest.mark.parametrize("optimizer", [SAM, StableSAM, GSAM, LookSAM, UnknownGSAM])
def test_sam_step_on_one_process_is_sam_step_bit_for_bit(optimizer):
    xs, ys = make_data(steps=4)
    models = [make_model(), make_model()]
    opts = [optimizer(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9) for m in models]
    for step in range(4):

        def closure(model, step=step):
            loss = F.cross_entropy(model(xs[step]), ys[step])
            loss.backward()
            return loss

        opts[0].zero_grad()
        opts[0].step(lambda: closure(models[0]), model=models[0])
        sam_step(opts[1], models[1], lambda: closure(models[1]))
    assert_states(models[0].state_dict(), models[1].state_dict(), exact=True)


def test_sam_step_runs_esam_s_per_sample_closure_as_esam_step_does():
    xs, ys = make_data(steps=4)
    models = [make_model(), make_model()]
    opts = [
        ESAM(m.parameters(), torch.optim.SGD, rho=0.5, beta=0.5, gamma=0.5, seed=1, lr=0.1)
        for m in models
    ]
    calls = [[], []]
    for step in range(4):

        def closure(which, rows=None, step=step):
            calls[which].append(rows)
            x, y = (xs[step], ys[step]) if rows is None else (xs[step][rows], ys[step][rows])
            return F.cross_entropy(models[which](x), y, reduction="none")

        opts[0].zero_grad()
        losses = [opts[0].step(lambda rows=None: closure(0, rows), model=models[0])]
        losses.append(sam_step(opts[1], models[1], lambda rows=None: closure(1, rows)))
        assert torch.equal(losses[0], losses[1])
    assert_states(models[0].state_dict(), models[1].state_dict(), exact=True)
    assert [r is None for r in calls[1]] == [True, True, False] * 4  # select, then the rows
    assert all(len(r) == GLOBAL_BATCH // 2 for r in calls[1][2::3])


def test_sam_step_restores_the_weights_when_the_second_pass_raises():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    xs, ys = make_data()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass failed")
        loss = F.cross_entropy(model(xs[0]), ys[0])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="second pass failed"):
        sam_step(opt, model, closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.is_perturbed


@pytest.mark.parametrize(
    ("options", "match"),
    [({"perturbation": "shared"}, "perturbation"), ({"statistics": "median"}, "statistics")],
)
def test_sam_step_rejects_unknown_options(options, match):
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=match):
        sam_step(opt, model, lambda: None, **options)
    with pytest.raises(ValueError, match=match), first_pass(model, **options):
        pass


# -- per-process ε for updates that use g: directions averaged --------------------------


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def shard_gradient(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return flat(p.grad for p in model.parameters())


def shard_direction(name, model, x, y, g_v):
    """This shard's direction and its g_v term, from the papers' formulas (SGD step aside)."""
    params = list(model.parameters())
    w = torch.nn.utils.parameters_to_vector(params).detach().clone()
    g = shard_gradient(model, x, y)
    stats = [b.clone() for b in model.buffers()]
    if name == "looksam" and g_v is not None:  # a reuse step
        return g + 0.7 * g.norm() / g_v.norm() * g_v, None, stats
    torch.nn.utils.vector_to_parameters(w + 0.05 * g / g.norm(), params)
    g_s = shard_gradient(model, x, y)
    torch.nn.utils.vector_to_parameters(w, params)
    if name == "stablesam":
        return g.norm() / g_s.norm() * g_s, None, stats
    if name == "gsam":
        g_perp = g - g.dot(g_s) / g_s.dot(g_s) * g_s
        return g_s - 0.4 * g_perp, None, stats
    return g_s, g_s - g.dot(g_s) / g.dot(g) * g, stats


def averaged_direction_run(name):
    """One process: each step, every shard's direction from the same w and statistics,
    their mean as the SGD gradient, the running statistics averaged over the shards."""
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = make_data(steps=FAMILY_LOCAL_STEPS)
    g_v = None
    for step in range(FAMILY_LOCAL_STEPS):
        start = [b.clone() for b in model.buffers()]
        reused = g_v if step % LOOKSAM_K else None
        directions, g_vs, stats = [], [], []
        for r in range(WORLD):
            with torch.no_grad():
                for b, s in zip(model.buffers(), start):
                    b.copy_(s)
            x, y = shard(xs[step], r, WORLD), shard(ys[step], r, WORLD)
            d, shard_g_v, shard_stats = shard_direction(name, model, x, y, reused)
            directions.append(d)
            g_vs.append(shard_g_v)
            stats.append(shard_stats)
        if reused is None and name == "looksam":
            g_v = torch.stack(g_vs).mean(dim=0)
        with torch.no_grad():
            for i, b in enumerate(model.buffers()):
                b.copy_(torch.stack([s[i] for s in stats]).float().mean(dim=0).to(b.dtype))
        mean = torch.stack(directions).mean(dim=0)
        for p, d in zip(model.parameters(), mean.split([p.numel() for p in model.parameters()])):
            p.grad = d.view_as(p).clone()
        base.step()
    return model.state_dict(), g_v


@pytest.mark.parametrize("name", ["stablesam", "gsam", "looksam", "stablesam_plain"])
def test_per_process_directions_keep_replicas_identical(runs, name):
    rank0, rank1 = (run[name] for run in runs["family_local"])
    assert_states(rank0["state"], rank1["state"], exact=True)
    assert rank0["replica_difference"] == rank1["replica_difference"] == 0.0
    for step in range(FAMILY_LOCAL_STEPS):  # each process perturbed with its own gradient
        assert not torch.allclose(rank0["first_grads"][step], rank1["first_grads"][step])


@pytest.mark.parametrize("name", ["stablesam", "gsam", "looksam", "stablesam_plain"])
def test_per_process_directions_equal_one_process_averaging_shard_directions(runs, name):
    expected, g_v = averaged_direction_run(name.removesuffix("_plain"))
    for run in runs["family_local"]:
        assert_states(run[name]["state"], expected, exact=False)
    if g_v is not None:
        for run in runs["family_local"]:
            torch.testing.assert_close(flat(kept_g_v(run[name]["optimizer"])), g_v)


def kept_g_v(state_dict):
    return [state_dict["state"][i]["g_v"] for i in sorted(state_dict["state"])]


def test_looksam_keeps_the_same_reused_direction_on_every_process(runs):
    rank0, rank1 = (run["looksam"]["optimizer"] for run in runs["family_local"])
    groups = [rank0["param_groups"][0], rank1["param_groups"][0]]
    assert groups[0]["steps_done"] == groups[1]["steps_done"] == FAMILY_LOCAL_STEPS
    assert torch.equal(flat(kept_g_v(rank0)), flat(kept_g_v(rank1)))
    assert torch.equal(groups[0]["g_v_norm"], groups[1]["g_v_norm"])


# -- ESAM with per-process ε: own gradient, own samples, averaged g_s ----------------------


def esam_reference_run(subsets):
    """One process: each step, every shard's ESAM step from the same w and statistics —
    ε_r = ρ·g_S,r/(β‖g_S,r‖) on the step's tensors S, the ⌈γ·B_r⌉ rows whose loss rose
    most, their mean loss's gradient at w + ε_r — with the mean over shards as the SGD
    gradient and the running statistics averaged over the shards' first passes."""
    model = make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    xs, ys = make_data(steps=ESAM_STEPS)
    chosen = []
    for step in range(ESAM_STEPS):
        start = [b.clone() for b in model.buffers()]
        mask = torch.cat(
            [torch.full((p.numel(),), float(k)) for p, k in zip(params, subsets[step])]
        )
        w = parameters_to_vector(params).detach().clone()
        surrogates, stats = [], []
        for r in range(WORLD):
            with torch.no_grad():
                for b, s in zip(model.buffers(), start):
                    b.copy_(s)
            x, y = shard(xs[step], r, WORLD), shard(ys[step], r, WORLD)
            before = F.cross_entropy(model(x), y, reduction="none")
            stats.append([b.clone() for b in model.buffers()])
            g = mask * parameters_to_vector(torch.autograd.grad(before.mean(), params))
            eps = ESAM_RHO * g / (ESAM_BETA * g.norm()) if g.norm() > 0 else torch.zeros_like(g)
            vector_to_parameters(w + eps, params)
            with torch.no_grad():
                after = F.cross_entropy(model(x), y, reduction="none")
            rows = torch.topk(after - before.detach(), math.ceil(ESAM_GAMMA * len(y))).indices
            chosen.append(set(rows.tolist()))
            g_s = torch.autograd.grad(F.cross_entropy(model(x[rows]), y[rows]), params)
            surrogates.append(parameters_to_vector(g_s))
            vector_to_parameters(w, params)
        with torch.no_grad():
            for i, b in enumerate(model.buffers()):
                b.copy_(torch.stack([s[i] for s in stats]).float().mean(dim=0).to(b.dtype))
        mean = torch.stack(surrogates).mean(dim=0)
        for p, d in zip(params, mean.split([p.numel() for p in params])):
            p.grad = d.view_as(p).clone()
        base.step()
    return model.state_dict(), chosen


def test_esam_under_ddp_perturbs_and_selects_per_process_and_averages_g_s(runs):
    rank0, rank1 = runs["esam_local"]
    assert rank0["subsets"] == rank1["subsets"]  # the draw depends on seed and step only
    assert any(0 < sum(s) < len(s) for s in rank0["subsets"])
    for step in range(ESAM_STEPS):  # each process perturbed with its own gradient
        assert not torch.allclose(rank0["perturbed"][step], rank1["perturbed"][step])
    expected, chosen = esam_reference_run(rank0["subsets"])
    for rank, run in enumerate((rank0, rank1)):
        rows = [set(r.tolist()) for r in run["chosen"]]
        assert rows == chosen[rank::WORLD]  # this process's own ⌈γ·B_r⌉ samples
        assert_states(run["state"], expected, exact=False)
        assert run["replica_difference"] == 0.0
    assert_states(rank0["state"], rank1["state"], exact=True)
