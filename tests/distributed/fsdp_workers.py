"""Code that runs inside the spawned processes of the FSDP2 tests.

As in ``ddp_workers.py``: module-level functions ``fn(rank, world_size, out_dir)`` that
write what they saw with ``torch.save``; the tests compare it with single-process runs
of their own. The models are float64 and shard unevenly (a 10-row weight on 4 ranks
splits 3, 3, 3, 1 and a 3-row one 1, 1, 1, 0), so empty local shards are covered.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from flatmin import ESAM, GSAM, MESA, SAM, LookSAM, StableSAM
from flatmin.distributed import m_sharpness_step, sam_step
from flatmin.distributed.collectives import all_gather_rows, max_replica_difference
from flatmin.distributed.fsdp import reshard
from flatmin.distributed.mesa import DistributedMESA
from flatmin.distributed.sharded_checkpoint import (
    load_sharded,
    load_sharded_state_dict,
    per_rank,
    save_sharded,
    sharded_state_dict,
)
from flatmin.train.ddp import train_in_group
from flatmin.train.fsdp import FSDPTrainer
from tests.distributed.ddp_workers import train_config
from tests.distributed.sharded_saf_workers import sharded_store_run

GLOBAL_BATCH, STEPS = 16, 3
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
ADAMW = dict(lr=0.01, weight_decay=1e-2)

FAMILY = {
    "sam_sgd": lambda p: SAM(p, torch.optim.SGD, rho=0.05, **SGD),
    "sam_adamw": lambda p: SAM(p, torch.optim.AdamW, rho=0.05, **ADAMW),
    "asam_clipped": lambda p: SAM(
        p, torch.optim.SGD, rho=0.5, adaptive="weights", max_grad_norm=0.05, **SGD
    ),
    "stablesam_sgd": lambda p: StableSAM(p, torch.optim.SGD, rho=0.05, **SGD),
    "stablesam_adamw": lambda p: StableSAM(p, torch.optim.AdamW, rho=0.05, **ADAMW),
    "gsam_sgd": lambda p: GSAM(p, torch.optim.SGD, rho=0.05, alpha=0.4, rho_min=0.05, **SGD),
    "looksam_adamw": lambda p: LookSAM(p, torch.optim.AdamW, rho=0.05, k=2, alpha=0.7, **ADAMW),
    "esam_sgd": lambda p: ESAM(p, torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, seed=7, **SGD),
    "esam_adamw": lambda p: ESAM(
        p, torch.optim.AdamW, rho=0.05, beta=0.6, gamma=0.5, seed=7, **ADAMW
    ),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(torch.float64)


def shard_model(model: nn.Module, mesh, reshard_after_forward: bool | None = None) -> nn.Module:
    """``fully_shard`` every Linear layer, then the root (with its default settings)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    return model


def family_data(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (steps, GLOBAL_BATCH), generator=gen)


def rows(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per = t.shape[0] // world_size
    return t[rank * per : (rank + 1) * per]


def closure_for(optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The optimizer's kind of closure: per-sample losses for ESAM, else forward+backward."""
    if optimizer.per_sample_closure:

        def per_sample(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")

        return per_sample

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def full(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as a whole tensor (all-gathered from the shards)."""
    return [
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def family_run(rank: int, world_size: int, out_dir: str) -> None:
    """Every member on an FSDP2 model through sam_step(perturbation="global"): the
    weights after each step, the kind of the base optimizer's per-parameter state and the
    collectives of one first_step (and one GSAM second_step)."""
    mesh = init_device_mesh("cpu", (world_size,))
    xs, ys = family_data()
    results = {}
    for name, make in FAMILY.items():
        model = shard_model(mlp(), mesh)
        opt = make(model.parameters())
        weights = []
        for step in range(STEPS):
            x, y = rows(xs[step], rank, world_size), rows(ys[step], rank, world_size)
            sam_step(opt, model, closure_for(opt, model, x, y), perturbation="global")
            weights.append(full(model))
        saved = opt.state_dict()["state"]
        state = [v for s in saved.values() for v in s.values() if torch.is_tensor(v)]
        results[name] = {
            "weights": weights,
            "state_keys": sorted({key for s in saved.values() for key in s}),
            "shaped_state_is_sharded": [isinstance(v, DTensor) for v in state if v.dim() > 0],
            "local_rows": [p.to_local().shape[0] for p in model.parameters()],
        }
    results["collectives"] = collectives_of_one_step(rank, world_size, mesh)
    if world_size == 4:
        results["hsdp"] = hsdp_run(rank, world_size)
    torch.save(results, Path(out_dir) / f"fsdp_family_{rank}.pt")


HSDP_FAMILY = ("sam_sgd", "stablesam_adamw", "gsam_sgd", "looksam_adamw")


def hsdp_run(rank: int, world_size: int) -> dict[str, list]:
    """HSDP on 4 processes: a 2 x 2 mesh that replicates over its first dimension and
    shards over its second, so the norms must be reduced over the shard groups only."""
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    xs, ys = family_data()
    weights = {}
    for name in HSDP_FAMILY:
        model = shard_model(mlp(), mesh)
        opt = FAMILY[name](model.parameters())
        for step in range(STEPS):
            x, y = rows(xs[step], rank, world_size), rows(ys[step], rank, world_size)
            sam_step(opt, model, closure_for(opt, model, x, y), perturbation="global")
        weights[name] = full(model)
    return weights


def collectives_of_one_step(rank: int, world_size: int, mesh) -> dict[str, list]:
    """The collectives (name, input shapes) that each two-pass member's first_step and
    second_step issue by themselves (LookSAM's first step is a full one), as torch's
    profiler records them."""
    xs, ys = family_data()
    x, y = rows(xs[0], rank, world_size), rows(ys[0], rank, world_size)
    seen = {}
    members = {"sam": "sam_sgd", "stablesam": "stablesam_sgd", "gsam": "gsam_sgd",
               "looksam": "looksam_adamw"}  # fmt: skip
    for name, make in ((name, FAMILY[key]) for name, key in members.items()):
        model = shard_model(mlp(), mesh)
        opt = make(model.parameters())
        closure_for(opt, model, x, y)()
        with torch.profiler.profile(record_shapes=True) as first:
            opt.first_step(zero_grad=True)
        closure_for(opt, model, x, y)()
        with torch.profiler.profile(record_shapes=True) as second:
            opt.second_step(zero_grad=True)
        for step, prof in (("first_step", first), ("second_step", second)):
            seen[f"{name}.{step}"] = [
                (e.name, e.input_shapes) for e in prof.events() if e.name.startswith("gloo:")
            ]
    return seen


def naive_sam_step(model: nn.Module, base, x, y, rho: float) -> None:
    """SAM as a per-tensor port would run it on shards: each rank's ‖g‖ over its own
    shards only (no error, a different ε on every rank)."""
    closure_for(base, model, x, y)()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        grads = [p.grad.to_local() for p in params]
        norm = torch.stack([g.norm() for g in grads]).norm()
        eps = [rho * g / norm for g in grads]
        for p, e in zip(params, eps):
            p.to_local().add_(e)
    base.zero_grad()
    closure_for(base, model, x, y)()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.to_local().sub_(e)
    base.step()
    base.zero_grad()


def naive_run(rank: int, world_size: int, out_dir: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    xs, ys = family_data()
    model = shard_model(mlp(), mesh)
    base = torch.optim.SGD(model.parameters(), **SGD)
    base.per_sample_closure = False  # closure_for reads the trait
    for step in range(STEPS):
        naive_sam_step(model, base, rows(xs[step], rank, world_size),
                       rows(ys[step], rank, world_size), rho=0.05)  # fmt: skip
    torch.save(full(model), Path(out_dir) / f"fsdp_naive_{rank}.pt")


M_LOCAL = 2


def m_sharpness_run(rank: int, world_size: int, out_dir: str) -> None:
    """m_sharpness_step on an FSDP2 model: sub-batches of M_LOCAL rows per rank."""
    mesh = init_device_mesh("cpu", (world_size,))
    xs, ys = family_data()
    model = shard_model(mlp(), mesh)
    opt = FAMILY["sam_sgd"](model.parameters())
    for step in range(STEPS):
        x, y = rows(xs[step], rank, world_size), rows(ys[step], rank, world_size)
        m_sharpness_step(opt, model, F.cross_entropy, x, y, m=M_LOCAL)
    torch.save(full(model), Path(out_dir) / f"fsdp_m_sharpness_{rank}.pt")


def refusal_run(rank: int, world_size: int, out_dir: str) -> None:
    """perturbation="local" on an FSDP2 model: the error, and the weights untouched."""
    mesh = init_device_mesh("cpu", (world_size,))
    xs, ys = family_data()
    model = shard_model(mlp(), mesh)
    opt = FAMILY["sam_sgd"](model.parameters())
    before = full(model)
    x, y = rows(xs[0], rank, world_size), rows(ys[0], rank, world_size)
    try:
        sam_step(opt, model, closure_for(opt, model, x, y))
        message = None
    except ValueError as error:
        message = str(error)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, full(model)))
    torch.save({"message": message, "unchanged": unchanged},
               Path(out_dir) / f"fsdp_refusal_{rank}.pt")  # fmt: skip


def gather_rows_run(rank: int, world_size: int, out_dir: str) -> None:
    """all_gather_rows (ESAM's global selection uses it) with r + 1 rows on rank r."""
    mine = torch.arange(rank + 1, dtype=torch.float64)[:, None] + torch.tensor([[0.0, 0.5]]) * rank
    torch.save(all_gather_rows(mine), Path(out_dir) / f"fsdp_gather_rows_{rank}.pt")


# -- sharded checkpoints (torch.distributed.checkpoint) -----------------------------------

RESUMED = {
    "sam_adamw": FAMILY["sam_adamw"],
    "sam_plain_sgd": lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.1),  # no state at all
    "gsam_sgd": FAMILY["gsam_sgd"],
    "looksam_adamw": FAMILY["looksam_adamw"],
    "esam_sgd": FAMILY["esam_sgd"],
}
RESUME_STEP = 3


def train_steps(opt, model, first: int, last: int, rank: int, world_size: int) -> None:
    """Steps ``first..last-1`` on the ranks' rows of fixed batches, with input noise
    drawn from each rank's torch generator (as dropout or augmentation would)."""
    xs, ys = family_data(steps=last)
    for step in range(first, last):
        x, y = rows(xs[step], rank, world_size), rows(ys[step], rank, world_size)
        x = x + 1e-3 * torch.randn(x.shape, dtype=x.dtype)
        sam_step(opt, model, closure_for(opt, model, x, y), perturbation="global")


def checkpoint_state(model, opt) -> dict:
    return {"train": sharded_state_dict(model, opt), "rng": per_rank(torch.get_rng_state())}


def dcp_first_run(rank: int, world_size: int, out_dir: str) -> None:
    """RESUME_STEP steps, a sharded checkpoint, RESUME_STEP more (the straight run)."""
    mesh = init_device_mesh("cpu", (world_size,))
    for name, make in RESUMED.items():
        torch.manual_seed(100 + rank)  # per-rank generators that differ
        model = shard_model(mlp(), mesh)
        opt = make(model.parameters())
        train_steps(opt, model, 0, RESUME_STEP, rank, world_size)
        save_sharded(checkpoint_state(model, opt), Path(out_dir) / f"dcp_{name}")
        train_steps(opt, model, RESUME_STEP, 2 * RESUME_STEP, rank, world_size)
        torch.save(
            {"weights": full(model), "optimizer": full_optimizer_state(opt)},
            Path(out_dir) / f"dcp_straight_{name}_{rank}.pt",
        )


def dcp_resumed_run(rank: int, world_size: int, out_dir: str) -> None:
    """New processes: a model built from another seed and a fresh optimizer, the
    checkpoint loaded, the last RESUME_STEP steps."""
    mesh = init_device_mesh("cpu", (world_size,))
    for name, make in RESUMED.items():
        torch.manual_seed(7)  # another init, and generators that are not the saved ones
        model = shard_model(mlp(), mesh)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        opt = make(model.parameters())
        state = checkpoint_state(model, opt)
        load_sharded(state, Path(out_dir) / f"dcp_{name}")
        load_sharded_state_dict(model, opt, state["train"])
        torch.set_rng_state(state["rng"][f"rank{rank}"])
        train_steps(opt, model, RESUME_STEP, 2 * RESUME_STEP, rank, world_size)
        torch.save(
            {"weights": full(model), "optimizer": full_optimizer_state(opt)},
            Path(out_dir) / f"dcp_resumed_{name}_{rank}.pt",
        )


def full_optimizer_state(opt) -> dict:
    """The optimizer's state dict with every DTensor gathered into a whole tensor."""
    saved = opt.state_dict()

    def whole(value):
        if isinstance(value, DTensor):
            return value.full_tensor().clone()
        return value.clone() if torch.is_tensor(value) else value

    return {
        "state": {i: {k: whole(v) for k, v in s.items()} for i, s in saved["state"].items()},
        "param_groups": [{k: whole(v) for k, v in g.items()} for g in saved["param_groups"]],
    }


# -- MESA with a sharded teacher ---------------------------------------------------------

MESA_STEPS = 3
MESA_SETTINGS = dict(decay=0.7, lam=0.8, tau=2.0, start_epoch=0, fold_batchnorm=False,
                     teacher_memory_format=None)  # fmt: skip


def bn_mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 3)).to(
        torch.float64
    )


def mesa_run(rank: int, world_size: int, out_dir: str) -> None:
    """SGD + MESA with student and teacher sharded alike: weights, teacher and teacher
    logits after each step, what each process holds of the teacher; and with BatchNorm,
    how far the processes' teacher buffers are apart."""
    mesh = init_device_mesh("cpu", (world_size,))
    xs, ys = family_data(steps=MESA_STEPS)
    results = {}
    for name, build in (("mlp", mlp), ("bn_mlp", bn_mlp)):
        model = build()
        mesa = MESA(model, **MESA_SETTINGS)
        for module in (model, mesa.teacher):  # layers keep their gathered weights
            shard_model(module, mesh, reshard_after_forward=False)
        wrapped = DistributedMESA(mesa)
        wrapped.set_epoch(1)  # the term is on from epoch start_epoch + 1
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []
        for step in range(MESA_STEPS):
            x, y = rows(xs[step], rank, world_size), rows(ys[step], rank, world_size)
            logits = model(x)
            loss = F.cross_entropy(logits, y) + wrapped(x, logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sharded_after_forward = all(isinstance(p, DTensor) for p in mesa.teacher.parameters())
            wrapped.update()
            with torch.no_grad():
                teacher_logits = mesa.teacher_logits(xs[0])
            reshard(mesa.teacher)
            steps.append({
                "student": full(model),
                "teacher": full(mesa.teacher),
                "teacher_logits": teacher_logits,
                "sharded_after_forward": sharded_after_forward,
            })  # fmt: skip
        results[name] = {
            "steps": steps,
            "teacher_bytes": (wrapped.memory_bytes, sum(t.numel() * 8 for t in full(model))),
            "buffer_difference": max_replica_difference(list(mesa.teacher.buffers())),
        }
    torch.save(results, Path(out_dir) / f"fsdp_mesa_{rank}.pt")


# -- the FSDP2 trainer --------------------------------------------------------------------

TRAIN_FSDP = ("sam", "esam", "saf", "mesa")  # ddp_workers.train_config: digits, BN CNN


def fsdp_trainer_first_round(rank: int, world_size: int, root: str) -> None:
    """Each method for two epochs, straight and stopped after one (resumed by
    :func:`fsdp_trainer_resume` in new processes)."""
    for method in TRAIN_FSDP:
        for name, stop_after in (("straight", None), ("split", 1)):
            train_in_group(rank, world_size, train_config(method),
                           f"{root}/fsdp-{method}-{name}", False, stop_after,
                           trainer=FSDPTrainer)  # fmt: skip


def fsdp_trainer_resume(rank: int, world_size: int, root: str) -> None:
    for method in TRAIN_FSDP:
        train_in_group(rank, world_size, train_config(method), f"{root}/fsdp-{method}-split",
                       True, None, trainer=FSDPTrainer)  # fmt: skip


def every_first_run(rank: int, world_size: int, out_dir: str) -> None:
    """Every FSDP2 scenario of the session's first spawn (and of the 4-process one)."""
    family_run(rank, world_size, out_dir)
    naive_run(rank, world_size, out_dir)
    m_sharpness_run(rank, world_size, out_dir)
    refusal_run(rank, world_size, out_dir)
    gather_rows_run(rank, world_size, out_dir)
    sharded_store_run(rank, world_size, out_dir)
    mesa_run(rank, world_size, out_dir)
    fsdp_trainer_first_round(rank, world_size, out_dir)
    dcp_first_run(rank, world_size, out_dir)


def every_resumed_run(rank: int, world_size: int, out_dir: str) -> None:
    """The FSDP2 scenarios of the session's second spawn."""
    dcp_resumed_run(rank, world_size, out_dir)
    fsdp_trainer_resume(rank, world_size, out_dir)
