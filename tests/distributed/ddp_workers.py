"""Code that runs inside the spawned processes of the distributed tests.

Each worker is a module-level function ``fn(rank, world_size, out_dir, ...)`` (so the
``spawn`` start method can pickle it) that writes what it saw to ``out_dir`` with
``torch.save``; the tests compare those files with computations of their own.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from flatmin import ESAM, GSAM, MESA, SAF, SAM, LookSAM, StableSAM
from flatmin.distributed import first_pass, reduce_metrics, sam_step
from flatmin.distributed.checkpoint import load_on_every_rank, save_on_rank0
from flatmin.distributed.collectives import max_replica_difference
from flatmin.distributed.mesa import DistributedMESA
from flatmin.distributed.saf import DistributedSAF
from flatmin.optim.bn import running_stats_frozen
from flatmin.train.config import TrainConfig
from flatmin.train.ddp import train_in_group
from flatmin.train.registry import METHODS
from tests.distributed.saf_workers import all_saf_runs, rank_order

GLOBAL_BATCH = 8
STEPS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def make_data(steps: int = STEPS, batch: int = GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(steps, batch, 5, generator=gen), torch.randint(
        0, 3, (steps, batch), generator=gen
    )


def shard(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per = t.shape[0] // world_size
    return t[rank * per : (rank + 1) * per]


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


def sam_run(rank: int, world_size: int, out_dir: str, perturbation: str, stable: bool) -> None:
    """STEPS SAM steps; records each step's first-pass gradient and the final state."""
    model = make_model()
    ddp = DDP(model)
    make = StableSAM if stable else SAM
    opt = make(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    xs, ys = make_data()
    first_grads = []
    for step in range(STEPS):
        x, y = shard(xs[step], rank, world_size), shard(ys[step], rank, world_size)
        with first_pass(ddp, perturbation):
            F.cross_entropy(ddp(x), y).backward()
        first_grads.append(flat_grads(ddp))
        opt.first_step(zero_grad=True)
        with torch.no_grad():
            perturbed = [p.clone() for p in model.parameters()]
        with running_stats_frozen(ddp):
            F.cross_entropy(ddp(x), y).backward()
        opt.second_step(zero_grad=True)
    torch.save(
        {
            "first_grads": first_grads,
            "perturbed_last": perturbed,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
        },
        Path(out_dir) / f"sam_{perturbation}_{int(stable)}_{rank}.pt",
    )


def sam_step_run(rank: int, world_size: int, out_dir: str) -> None:
    """The one-call helper on DDP and on a plain module (averaged by the helper)."""
    xs, ys = make_data()
    results = {}
    for wrapped in (True, False):
        model = make_model()
        net = DDP(model) if wrapped else model
        opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        for step in range(STEPS):
            x, y = shard(xs[step], rank, world_size), shard(ys[step], rank, world_size)

            def closure(x=x, y=y, net=net):
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            loss = sam_step(opt, net, closure)
        results["ddp" if wrapped else "plain"] = {
            k: v.clone() for k, v in model.state_dict().items()
        }
        results[f"replica_difference_{wrapped}"] = max_replica_difference(
            [*model.parameters(), *model.buffers()]
        )
    results["metrics"] = reduce_metrics({"loss": loss, "rank": rank, "count": 1}, op="mean")
    results["metrics_sum"] = reduce_metrics({"rank": torch.tensor(float(rank))}, op="sum")
    torch.save(results, Path(out_dir) / f"sam_step_{rank}.pt")


def nonfinite_run(rank: int, world_size: int, out_dir: str) -> None:
    """skip_nonfinite with per-process ε: rank 1's second batch has a non-finite input."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    ddp = DDP(model)
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, skip_nonfinite=True)
    xs, ys = make_data()
    weights = []
    for step in range(2):
        x, y = shard(xs[step], rank, world_size).clone(), shard(ys[step], rank, world_size)
        if step == 1 and rank == 1:
            x[0, 0] = float("inf")

        def closure(x=x, y=y):
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss

        sam_step(opt, ddp, closure)
        weights.append(model.weight.detach().clone())
    torch.save(weights, Path(out_dir) / f"sam_nonfinite_{rank}.pt")


FAMILY_GLOBAL = {
    "gsam": lambda params: GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1),
    "looksam": lambda params: LookSAM(params, torch.optim.SGD, rho=0.05, k=2, lr=0.1),
}


def family_global_run(rank: int, world_size: int, out_dir: str) -> None:
    """GSAM and LookSAM (reuse steps included) with the averaged gradient on DDP."""
    xs, ys = make_data(steps=4)
    states = {}
    for name, make in FAMILY_GLOBAL.items():
        model = make_model()
        ddp = DDP(model)
        opt = make(ddp.parameters())
        for step in range(4):
            x, y = shard(xs[step], rank, world_size), shard(ys[step], rank, world_size)

            def closure(x=x, y=y, ddp=ddp):
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                return loss

            sam_step(opt, ddp, closure, perturbation="global")
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(states, Path(out_dir) / f"sam_family_global_{rank}.pt")


FAMILY_LOCAL_STEPS, LOOKSAM_K = 4, 2
FAMILY_LOCAL = {
    "stablesam": lambda params: StableSAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "gsam": lambda params: GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, momentum=0.9),
    "looksam": lambda params: LookSAM(
        params, torch.optim.SGD, rho=0.05, k=LOOKSAM_K, alpha=0.7, lr=0.1, momentum=0.9
    ),
}


def family_local_run(rank: int, world_size: int, out_dir: str) -> None:
    """StableSAM, GSAM and LookSAM with per-process ε (directions averaged) on DDP, and
    StableSAM on a plain module; records each step's first-pass gradient."""
    xs, ys = make_data(steps=FAMILY_LOCAL_STEPS)
    results = {}
    for name, wrapped in [(name, True) for name in FAMILY_LOCAL] + [("stablesam", False)]:
        model = make_model()
        net = DDP(model) if wrapped else model
        opt = FAMILY_LOCAL[name](net.parameters())
        first_grads = []
        for step in range(FAMILY_LOCAL_STEPS):
            x, y = shard(xs[step], rank, world_size), shard(ys[step], rank, world_size)
            calls = []

            def closure(x=x, y=y, net=net, calls=calls, seen=first_grads):
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                if not calls:
                    seen.append(flat_grads(net))
                calls.append(1)
                return loss

            sam_step(opt, net, closure)
        results[name if wrapped else f"{name}_plain"] = {
            "first_grads": first_grads,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "replica_difference": max_replica_difference([*model.parameters(), *model.buffers()]),
        }
    torch.save(results, Path(out_dir) / f"sam_family_local_{rank}.pt")


ESAM_STEPS, ESAM_RHO, ESAM_BETA, ESAM_GAMMA, ESAM_SEED = 3, 0.5, 0.5, 0.5, 3


def esam_local_run(rank: int, world_size: int, out_dir: str) -> None:
    """ESAM (weight subsets and data selection) with per-process ε on DDP through
    sam_step and its per-sample closure; records each step's subset, the perturbed
    weights seen by the selection pass and the rows chosen for the second pass."""
    model = make_model()
    ddp = DDP(model)
    opt = ESAM(ddp.parameters(), torch.optim.SGD, rho=ESAM_RHO, beta=ESAM_BETA,
               gamma=ESAM_GAMMA, seed=ESAM_SEED, lr=0.1, momentum=0.9)  # fmt: skip
    xs, ys = make_data(steps=ESAM_STEPS)
    subsets, perturbed, chosen = [], [], []
    for step in range(ESAM_STEPS):
        x, y = shard(xs[step], rank, world_size), shard(ys[step], rank, world_size)
        subsets.append(opt.perturbed_subset())
        calls = []

        def closure(rows=None, x=x, y=y, calls=calls):
            calls.append(rows)
            if len(calls) == 2:  # the selection pass, at w + ε
                perturbed.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
            if rows is not None:
                chosen.append(rows.clone())
                x, y = x[rows], y[rows]
            return F.cross_entropy(ddp(x), y, reduction="none")

        sam_step(opt, ddp, closure)
    torch.save(
        {
            "subsets": subsets,
            "perturbed": perturbed,
            "chosen": chosen,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "replica_difference": max_replica_difference([*model.parameters(), *model.buffers()]),
        },
        Path(out_dir) / f"esam_local_{rank}.pt",
    )


def all_sam_runs(rank: int, world_size: int, out_dir: str) -> None:
    """Every SAM scenario in one group, so the test module spawns processes once."""
    esam_local_run(rank, world_size, out_dir)
    nonfinite_run(rank, world_size, out_dir)
    family_global_run(rank, world_size, out_dir)
    family_local_run(rank, world_size, out_dir)
    sam_run(rank, world_size, out_dir, "local", False)
    sam_run(rank, world_size, out_dir, "global", False)
    sam_run(rank, world_size, out_dir, "global", True)
    sam_step_run(rank, world_size, out_dir)


# -- SAM + SAF + MESA with a rank-0 checkpoint and a restart --------------------------------

FULL_SAMPLES, FULL_EPOCHS, FULL_RESUME_EPOCH = 16, 4, 2


def full_state(model, opt, saf, mesa) -> dict:
    clone = lambda tree: {k: v.clone() if torch.is_tensor(v) else v for k, v in tree.items()}  # noqa: E731
    return {
        "model": clone(model.state_dict()),
        "optimizer": opt.state_dict(),
        "saf": clone(saf.state_dict()["store"]),
        "teacher": clone(mesa.teacher.state_dict()),
    }


def full_run(rank: int, world_size: int, out_dir: str, resume: bool) -> None:
    """SAM (per-process ε) + SAF + MESA on DDP; checkpoint after epoch 1, or resume there."""
    out = Path(out_dir)
    model = make_model()
    if rank == 1:  # a different initialization on rank 1: DDP and MESA must replace it
        with torch.no_grad():
            model[0].weight.add_(1.0)
    mesa = DistributedMESA(MESA(model, decay=0.9, lam=0.5, start_epoch=0))
    ddp = DDP(model)
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    saf = DistributedSAF(SAF(FULL_SAMPLES, 3, lag_epochs=1, start_epoch=0))
    gen = torch.Generator().manual_seed(4)
    xs, ys = (
        torch.randn(FULL_SAMPLES, 5, generator=gen),
        torch.randint(0, 3, (FULL_SAMPLES,), generator=gen),
    )
    first_epoch = 0
    if resume:
        checkpoint = load_on_every_rank(out / "checkpoint.pt")
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        saf.load_state_dict(checkpoint["saf"])
        mesa.load_state_dict(checkpoint["mesa"])
        first_epoch = checkpoint["epoch"]
    teacher_differences = []
    for epoch in range(first_epoch, FULL_EPOCHS):
        saf.set_epoch(epoch)
        mesa.set_epoch(epoch)
        order = torch.tensor(rank_order(FULL_SAMPLES, epoch, rank, world_size))
        for idx in order.split(2):
            x, y = xs[idx], ys[idx]

            def closure(x=x, y=y, idx=idx):
                logits = ddp(x)
                loss = F.cross_entropy(logits, y) + saf(logits, idx) + mesa(x, logits)
                loss.backward()
                return loss

            sam_step(opt, ddp, closure)
            mesa.update()
        teacher_differences.append(
            max_replica_difference([*mesa.teacher.parameters(), *mesa.teacher.buffers()])
        )
        if not resume and epoch + 1 == FULL_RESUME_EPOCH:
            save_on_rank0(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "saf": saf.state_dict(),
                    "mesa": mesa.state_dict(),
                    "epoch": epoch + 1,
                },
                out / "checkpoint.pt",
                replicated=[*model.parameters(), *model.buffers()],
            )
    torch.save(
        {"final": full_state(model, opt, saf, mesa), "teacher_differences": teacher_differences},
        out / f"full_{'resumed' if resume else 'straight'}_{rank}.pt",
    )


# -- the reference trainer ---------------------------------------------------------------

TRAIN_RESUMED = ("sam", "saf", "mesa")
TRAIN_FAST = {
    "saf": {"start_epoch": 0, "lag_epochs": 1},
    "mesa": {"start_epoch": 0, "ema_decay": 0.9},
}


def train_config(method: str) -> TrainConfig:
    return TrainConfig(
        method=method,
        dataset="digits",
        model="cnn",  # BatchNorm: statistics must be identical on both processes
        epochs=2,
        batch_size=16,
        eval_batch_size=500,
        subset=48,
        hyperparameters=dict(TRAIN_FAST.get(method, {})),
    ).resolved()


def trainer_first_round(rank: int, world_size: int, root: str) -> None:
    """Every registered method for an epoch; three of them for two epochs, straight and
    stopped after one (to be resumed by :func:`trainer_resume` in new processes)."""
    for method in METHODS:
        stop_after = None if method in TRAIN_RESUMED else 1
        run_dir = f"{root}/{method}-straight"
        train_in_group(rank, world_size, train_config(method), run_dir, False, stop_after)
    for method in TRAIN_RESUMED:
        run_dir = f"{root}/{method}-split"
        train_in_group(rank, world_size, train_config(method), run_dir, False, 1)


def trainer_resume(rank: int, world_size: int, root: str) -> None:
    for method in TRAIN_RESUMED:
        run_dir = f"{root}/{method}-split"
        train_in_group(rank, world_size, train_config(method), run_dir, True, None)


# -- the two spawns of the session ------------------------------------------------------


def every_first_run(rank: int, world_size: int, out_dir: str) -> None:
    """All scenarios that need no earlier result: one spawn serves every test module."""
    all_sam_runs(rank, world_size, out_dir)
    all_saf_runs(rank, world_size, out_dir)
    full_run(rank, world_size, out_dir, False)
    trainer_first_round(rank, world_size, out_dir)


def every_resumed_run(rank: int, world_size: int, out_dir: str) -> None:
    """Fresh processes that continue from the first spawn's rank-0 checkpoints."""
    full_run(rank, world_size, out_dir, True)
    trainer_resume(rank, world_size, out_dir)


# -- the launcher ----------------------------------------------------------------------


def finish_at_different_times(rank: int, world_size: int, out_dir: str) -> None:
    """Rank 0 works a second longer than rank 1; each process notes when its function
    returned and when the process itself exits (after spawn's wrapper is done)."""
    import atexit
    import time

    if rank == 0:
        time.sleep(1.0)
    Path(out_dir, f"returned_{rank}").write_text(repr(time.time()))
    atexit.register(lambda: Path(out_dir, f"exited_{rank}").write_text(repr(time.time())))


def refuse_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 refuses")
