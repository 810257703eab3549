"""``flatmin bench fsdp-speed`` and ``flatmin bench sharded-store``: what sharding costs.

**FSDP2 against DDP** (:func:`fsdp_speed`). ``W`` gloo processes (one thread each unless
asked otherwise) build, in *one* process group, the same model (the trainer's
:func:`~flatmin.train.models.build_model`, seeded alike) several times: under
``DistributedDataParallel`` and sharded as the FSDP2 trainer shards it
(:func:`flatmin.train.fsdp.shard_model`). Each copy trains with its own optimizer:

* ``ddp_sam_global`` / ``fsdp_sam``: SAM through :func:`~flatmin.distributed.sam.sam_step`
  with the global ε — the same algorithm on both;
* ``ddp_sam_local``: SAM with DDP's default per-process ε (for reference);
* ``ddp_saf`` / ``fsdp_saf``: SGD + SAF, the replicated store
  (:class:`~flatmin.distributed.saf.DistributedSAF`) against the sharded one
  (:class:`~flatmin.distributed.sharded_saf.ShardedSAF`).

Every round runs ``steps`` training steps of every copy, interleaved (the order rotates
from round to round), each block between two barriers and timed on rank 0, so a block's
time is the slowest process's. The first ``warmup`` rounds are not counted. Reported: the
median over rounds of the per-round ratio FSDP2 / DDP, its range, and the median step
times.

**The sharded SAF store** (:func:`sharded_store`). For each ``W`` a new group of ``W``
processes holds both stores over the same ``N`` samples and ``C`` classes and looks up the
same batches (``B`` rows per process of a fresh permutation of the samples each call, as a
reshuffling sampler gives them): a recording call and a repeated one (SAM's second pass),
interleaved between the two stores. Reported per store: ``memory_bytes`` on the process
holding the most, the median time of each kind of call (the slowest process's, between
barriers), and the bytes in the outputs of one process's collectives per recording call
(its own rows included; the sharded store's counted from the owners of that call's
samples, the largest over processes and calls).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from flatmin.bench.stats import median
from flatmin.distributed.launch import spawn
from flatmin.distributed.saf import DistributedSAF
from flatmin.distributed.sam import sam_step
from flatmin.distributed.sharded_saf import ShardedSAF, block_of
from flatmin.optim import SAM
from flatmin.optim._buckets import local_part
from flatmin.optim._checks import check_int
from flatmin.train.fsdp import shard_model
from flatmin.train.models import build_model
from flatmin.trajectory.saf import SAF

INPUT_SHAPE, CLASSES = (1, 28, 28), 10  # Fashion-MNIST's images
SAF_SAMPLES, SAF_LAG = 60_000, 3
SETUPS = ("ddp_sam_global", "ddp_sam_local", "fsdp_sam", "ddp_saf", "fsdp_saf")
RATIOS = {  # name: (FSDP2 setup, DDP setup)
    "sam": ("fsdp_sam", "ddp_sam_global"),
    "sam_vs_per_process": ("fsdp_sam", "ddp_sam_local"),
    "saf": ("fsdp_saf", "ddp_saf"),
}


class _Copy:
    """One copy of the model with its optimizer and the step it takes."""

    def __init__(self, setup: str, model_name: str, mesh: Any) -> None:
        torch.manual_seed(0)
        model = build_model(model_name, CLASSES, INPUT_SHAPE)
        self.setup = setup
        self.model = shard_model(model, mesh) if setup.startswith("fsdp") else model
        self.net = self.model if setup.startswith("fsdp") else DistributedDataParallel(model)
        if setup.endswith("saf"):
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
            store = SAF(SAF_SAMPLES, CLASSES, lag_epochs=SAF_LAG, start_epoch=0)
            self.saf = (
                ShardedSAF.from_saf(store) if setup.startswith("fsdp") else DistributedSAF(store)
            )
            self.saf.set_epoch(1)
        else:
            self.opt = SAM(self.net.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
        self.perturbation = "local" if setup == "ddp_sam_local" else "global"

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        if self.setup.endswith("saf"):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y) + self.saf(logits, idx)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            return

        def closure() -> torch.Tensor:
            loss = F.cross_entropy(self.net(x), y)
            loss.backward()
            return loss

        self.opt.zero_grad()
        sam_step(self.opt, self.net, closure, perturbation=self.perturbation)

    def steps(self, batches: list[tuple[torch.Tensor, ...]]) -> None:
        for batch in batches:
            self.step(*batch)

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this process holds (its shards under FSDP2)."""
        return sum(local_part(p).numel() * p.element_size() for p in self.model.parameters())


def _batches(step: int, rank: int, world: int, batch: int):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(world * batch, *INPUT_SHAPE, generator=gen)[rank * batch : (rank + 1) * batch]
    y = torch.randint(0, CLASSES, (world * batch,), generator=gen)[
        rank * batch : (rank + 1) * batch
    ]
    idx = torch.randperm(SAF_SAMPLES, generator=gen)[: world * batch][
        rank * batch : (rank + 1) * batch
    ]
    return x, y, idx


def _timed(block: Callable[..., Any], *args: Any) -> float:
    """Seconds of ``block(*args)`` on the slowest process (between two barriers)."""
    dist.barrier()
    started = time.perf_counter()
    block(*args)
    dist.barrier()
    return time.perf_counter() - started


def _speed_worker(rank: int, world: int, options: dict[str, Any], path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for model_name in options["models"]:
        copies = [_Copy(setup, model_name, mesh) for setup in SETUPS]
        times: dict[str, list[float]] = {c.setup: [] for c in copies}
        step = 0
        for r in range(options["warmup"] + options["rounds"]):
            shift = r % len(copies)
            for copy in copies[shift:] + copies[:shift]:
                batches = [
                    _batches(step + k, rank, world, options["batch"])
                    for k in range(options["steps"])
                ]
                seconds = _timed(copy.steps, batches)
                if r >= options["warmup"]:
                    times[copy.setup].append(seconds / options["steps"])
            step += options["steps"]
        ratios = {
            name: [a / b for a, b in zip(times[fsdp], times[ddp], strict=True)]
            for name, (fsdp, ddp) in RATIOS.items()
        }
        results[model_name] = {
            "ms_per_step": {s: 1e3 * median(t) for s, t in times.items()},
            "ratio": {n: median(v) for n, v in ratios.items()},
            "ratio_range": {n: [min(v), max(v)] for n, v in ratios.items()},
            "parameter_bytes_per_process": {c.setup: c.parameter_bytes() for c in copies},
            "saf_store_bytes_per_process": {
                c.setup: c.saf.memory_bytes for c in copies if c.setup.endswith("saf")
            },
        }
    if rank == 0:
        Path(path).write_text(json.dumps(results))


def fsdp_speed(
    models: Sequence[str] = ("mlp", "cnn"),
    *,
    processes: int = 2,
    batch: int = 64,
    rounds: int = 15,
    warmup: int = 3,
    steps: int = 4,
    threads: int = 1,
    scratch: Path,
) -> dict[str, Any]:
    """FSDP2 against DDP in one group (see the module docstring); ``batch`` is per process."""
    options = {
        "models": list(models),
        "batch": check_int("batch", batch, minimum=1),
        "rounds": check_int("rounds", rounds, minimum=1),
        "warmup": check_int("warmup", warmup, minimum=0),
        "steps": check_int("steps", steps, minimum=1),
    }
    path = Path(scratch) / "fsdp_speed.partial.json"
    spawn(_speed_worker, check_int("processes", processes, minimum=2), options, str(path),
          threads_per_process=threads)  # fmt: skip
    results = json.loads(path.read_text())
    path.unlink()
    return {"options": {**options, "processes": processes, "threads": threads}, "models": results}


def format_speed(result: dict[str, Any]) -> str:
    o = result["options"]
    lines = [
        f"{o['processes']} processes x {o['threads']} thread(s), {o['batch']} samples per "
        f"process and step, {o['rounds']} rounds of {o['steps']} steps per setup "
        f"(after {o['warmup']} warm-up rounds); FSDP2 / DDP, median of per-round ratios [range]:"
    ]
    for name, r in result["models"].items():
        ms = r["ms_per_step"]
        lines.append(f"  {name}:")
        for ratio, (fsdp, ddp) in RATIOS.items():
            low, high = r["ratio_range"][ratio]
            lines.append(
                f"    {ratio:20s} {r['ratio'][ratio]:.2f} [{low:.2f}, {high:.2f}]   "
                f"{fsdp} {ms[fsdp]:.1f} ms / {ddp} {ms[ddp]:.1f} ms per step"
            )
        bytes_ = r["parameter_bytes_per_process"]
        lines.append(
            f"    parameters per process: DDP {bytes_['ddp_sam_global']:,} B, "
            f"FSDP2 {bytes_['fsdp_sam']:,} B; SAF store per process: replicated "
            f"{r['saf_store_bytes_per_process']['ddp_saf']:,} B, sharded "
            f"{r['saf_store_bytes_per_process']['fsdp_saf']:,} B (rank 0)"
        )
    return "\n".join(lines)


# -- the sharded store against the replicated one ----------------------------------------


def _store_call_bytes(store: str, world: int, rank: int, batch: int, row: int,
                      owners: list[int]) -> int:  # fmt: skip
    """Bytes in the outputs of ``rank``'s collectives in one recording call, its own rows
    included (``owners``: the owner of each row of the global batch)."""
    if world == 1:
        return 0
    if store == "replicated":  # all-gathers of (size, epoch), the indices and the rows
        return world * 2 * 8 + world * batch * (8 + row)
    mine = sum(owner == rank for owner in owners)
    # the header's all-gather; requests (index + row) and replies (valid + row); 2 counts
    return world * (world + 3) * 8 + mine * (8 + row) + batch * (1 + row) + 2 * 8


def _store_worker(rank: int, world: int, options: dict[str, Any], path: str) -> None:
    results = []
    batch, calls = options["batch"], options["calls"]
    for samples, classes in options["cases"]:
        stores = {
            "replicated": DistributedSAF(SAF(samples, classes, lag_epochs=SAF_LAG, start_epoch=0)),
            "sharded": ShardedSAF(samples, classes, lag_epochs=SAF_LAG, start_epoch=0),
        }
        times = {(name, kind): [] for name in stores for kind in ("record", "repeat")}
        received = {name: [] for name in stores}
        chunk = math.ceil(samples / world)
        for call in range(options["warmup"] + calls):
            gen = torch.Generator().manual_seed(call)
            order = torch.randperm(samples, generator=gen)[: world * batch]
            logits = torch.randn(world * batch, classes, generator=gen)
            idx, rows = (
                order[rank * batch : (rank + 1) * batch],
                logits[rank * batch : (rank + 1) * batch],
            )
            names = list(stores) if call % 2 == 0 else list(stores)[::-1]
            for name in names:
                store = stores[name]
                store.set_epoch(call)
                for kind in ("record", "repeat"):
                    seconds = _timed(store, rows, idx)
                    if call >= options["warmup"]:
                        times[(name, kind)].append(seconds)
                row = classes * 2  # float16 rows
                owners = (order // chunk).tolist()
                received[name].append(_store_call_bytes(name, world, rank, batch, row, owners))
        memory = torch.tensor([s.memory_bytes for s in stores.values()], dtype=torch.long)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        most = torch.tensor([max(received[n]) for n in stores], dtype=torch.long)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        results.append({
            "samples": samples, "classes": classes, "processes": world,
            "block": list(block_of(0, samples, world)),
            "memory_bytes": dict(zip(stores, memory.tolist())),
            "ms_per_call": {f"{n}_{k}": 1e3 * median(t) for (n, k), t in times.items()},
            "ratio": {
                kind: median([a / b for a, b in zip(times[("sharded", kind)],
                                                    times[("replicated", kind)], strict=True)])
                for kind in ("record", "repeat")
            },
            "received_bytes_per_call": dict(zip(stores, most.tolist())),
        })  # fmt: skip
    if rank == 0:
        Path(path).write_text(json.dumps(results))


def sharded_store(
    worlds: Sequence[int] = (1, 2, 4),
    cases: Sequence[tuple[int, int]] = ((50_000, 10), (20_000, 1000)),
    *,
    batch: int = 128,
    calls: int = 40,
    warmup: int = 4,
    threads: int = 1,
    scratch: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The sharded store against the replicated one at each ``W`` (module docstring)."""
    options = {
        "cases": [list(c) for c in cases],
        "batch": check_int("batch", batch, minimum=1),
        "calls": check_int("calls", calls, minimum=1),
        "warmup": check_int("warmup", warmup, minimum=0),
    }
    rows = []
    for world in worlds:
        path = Path(scratch) / f"sharded_store_{world}.partial.json"
        spawn(_store_worker, check_int("W", world, minimum=1), options, str(path),
              threads_per_process=threads)  # fmt: skip
        found = json.loads(path.read_text())
        path.unlink()
        rows.extend(found)
        for row in found:
            log(format_store_row(row))
    return {"options": {**options, "threads": threads, "worlds": list(worlds)}, "rows": rows}


def format_store_row(r: dict[str, Any]) -> str:
    ms = r["ms_per_call"]
    return (
        f"W={r['processes']} N={r['samples']:,} C={r['classes']}: store bytes per process "
        f"replicated {r['memory_bytes']['replicated']:,} / sharded {r['memory_bytes']['sharded']:,}; "
        f"ms per recording call {ms['replicated_record']:.2f} / {ms['sharded_record']:.2f} "
        f"(sharded/replicated {r['ratio']['record']:.2f}), repeated call "
        f"{ms['replicated_repeat']:.2f} / {ms['sharded_repeat']:.2f}; bytes received per "
        f"process and recording call {r['received_bytes_per_call']['replicated']:,} / "
        f"{r['received_bytes_per_call']['sharded']:,}"
    )
