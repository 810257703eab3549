"""The reference trainer with the model sharded across processes: FSDP2 (``--fsdp``).

``flatmin train --nproc N --fsdp`` starts N local processes (gloo, CPU); under
``torchrun`` the same command joins the group torchrun describes, on one machine or on
several:

.. code-block:: bash

    flatmin train --nproc 2 --fsdp --method sam --dataset digits --out runs/x
    torchrun --nnodes 2 --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        --rdzv-id RUN -m flatmin.cli train --fsdp --method saf --out runs/y

What changes against the DDP trainer (:mod:`flatmin.train.ddp`):

* The model is sharded with ``torch.distributed.fsdp.fully_shard`` over all processes
  (each top-level child module that holds parameters is one FSDP unit, then the root):
  each process keeps ``1/N`` of the weights, gradients and optimizer state.
* Every SAM-family method perturbs with the *global* ε (per-process ε needs each
  process's own full gradient, which FSDP2 never forms: see
  :mod:`flatmin.distributed.sam`); a step equals one process stepping on the global
  batch. SAF's store is sharded (:class:`~flatmin.distributed.sharded_saf.ShardedSAF`),
  MESA's teacher sharded like the student (:class:`~flatmin.distributed.mesa.DistributedMESA`).
* Checkpoints are sharded: ``checkpoint.pt`` holds what every process shares (the
  configuration, the schedule, the epoch, the metrics, the number of processes) and the
  name and SHA-256 digests of a ``torch.distributed.checkpoint`` directory beside it,
  where every process writes its shards of the weights, the optimizer state, SAF's store
  or MESA's teacher, and its own random generators. A new directory is written for each
  epoch and moved into place before ``checkpoint.pt`` names it, so an interrupted save
  leaves the previous epoch's pair intact. A run resumes bit-exactly on as many
  processes (``--resume --fsdp``).
* ``--track-sharpness`` is refused (the measurement perturbs a whole model).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from flatmin.distributed.collectives import (
    max_replica_difference,
    reduce_metrics,
    sync_norm_statistics,
)
from flatmin.distributed.fsdp import reshard
from flatmin.distributed.sharded_checkpoint import (
    load_sharded,
    load_sharded_state_dict,
    per_rank,
    save_sharded,
    sharded_state_dict,
)
from flatmin.train import checkpoint as ckpt
from flatmin.train.config import TrainConfig
from flatmin.train.ddp import DistributedTrainer, distribute_method
from flatmin.train.loop import Run
from flatmin.train.method import MESATerm, Method

SHARDED_PREFIX = "checkpoint-shards-"


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """``fully_shard`` each top-level child of ``model`` that holds parameters, then the
    root (the trainer's models are ``nn.Sequential`` stacks of layers and blocks)."""
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def use_sharded_parameters(optimizer: torch.optim.Optimizer, replaced: Mapping[int, Any]) -> None:
    """Point ``optimizer``'s param groups at the parameters that ``fully_shard`` put in
    place of the ones it was built with (``replaced``: id of the old → the new one). For
    an optimizer without state yet, as the registry builds it on the plain model."""
    if optimizer.state:
        raise RuntimeError("use_sharded_parameters needs an optimizer that has not stepped")
    for group in optimizer.param_groups:
        group["params"][:] = [replaced.get(id(p), p) for p in group["params"]]


class FSDPTrainer(DistributedTrainer):
    """:class:`~flatmin.train.ddp.DistributedTrainer` with the model, the optimizer state
    and the loss terms' state sharded across the processes (see the module docstring)."""

    sharded_checkpoint = True

    def __init__(self, config: TrainConfig, out_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(config, out_dir, **kwargs)
        self.check_config(self.config)
        self.mesh = init_device_mesh("cpu", (self.world_size,))

    @staticmethod
    def check_config(config: TrainConfig) -> None:
        """Refuse what a sharded run cannot do (a ValueError saying why)."""
        if config.track_sharpness:
            raise ValueError(
                "--track-sharpness measures a whole model, which no process holds under "
                "--fsdp; train without one of them"
            )

    @property
    def run_facts(self) -> dict[str, Any]:
        return {**super().run_facts, "fsdp": True}

    def wrap_model(self, model: nn.Module, method: Method) -> nn.Module:
        """Shard MESA's teacher and the model alike, point the optimizer at the shards,
        and give the method its sharded forms (global ε, ShardedSAF, DistributedMESA)."""
        for term in method.terms.values():
            if isinstance(term, MESATerm):  # FSDP2 shards contiguous tensors only
                teacher = term.mesa.teacher.to(memory_format=torch.contiguous_format)
                shard_model(teacher, self.mesh)
        plain = dict(model.named_parameters())
        shard_model(model, self.mesh)
        sharded = dict(model.named_parameters())
        use_sharded_parameters(method.optimizer, {id(plain[n]): sharded[n] for n in plain})
        distribute_method(method, sharded=True)
        return model

    def reduce_record(self, model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        """Equal BatchNorm statistics on every process, then averaged metrics."""
        reshard(model)  # the last step's gathered weights, if any
        sync_norm_statistics(model, "broadcast")
        difference = max_replica_difference(list(model.buffers()))
        if difference != 0.0:
            raise RuntimeError(
                f"the processes' buffers differ by up to {difference:g} after epoch "
                f"{record['epoch']}"
            )
        record.update(reduce_metrics({k: record[k] for k in ("train_loss", "train_acc")}))
        record.update(reduce_metrics({"images_per_s": record["images_per_s"]}, op="sum"))
        return record

    # -- sharded checkpoints -----------------------------------------------------------

    def _shards(self, run: Run) -> dict[str, Any]:
        """What every process writes of its own: the shards and its random generators."""
        reshard(run.model)  # evaluation's forward left gathered weights behind
        return {
            **sharded_state_dict(run.model, run.method.optimizer),
            "method_state": run.method.state_dict(),
            "rng": per_rank(ckpt.rng_state()),
        }

    def save(self, run: Run, config: dict, epoch: int, records: list, keep_checkpoint: bool):
        """Every process writes its shards into a new directory; the writer then names it
        in ``checkpoint.pt`` (with the files' digests) and removes the older ones."""
        if keep_checkpoint:  # a diverged epoch: the metrics only
            super().save(run, config, epoch, records, keep_checkpoint)
            return
        name = f"{SHARDED_PREFIX}{epoch:04d}"
        partial = self.out_dir / f".{name}.partial"
        if self.is_writer and partial.exists():
            shutil.rmtree(partial)
        dist.barrier()
        save_sharded(self._shards(run), partial)
        dist.barrier()
        if self.is_writer:
            with ckpt.interrupts_deferred():
                final = self.out_dir / name
                if final.exists():
                    shutil.rmtree(final)
                partial.rename(final)
                state = {  # the shards' keys stay: the directory holds them
                    "model": {}, "optimizer": {}, "method_state": {}, "rng": {},
                    "config": dict(config), "scheduler": run.scheduler.state_dict(),
                    "epoch": epoch, "metrics": records, "world_size": self.world_size,
                    "sharded": {"directory": name, "digests": ckpt.digests(final)},
                }  # fmt: skip
                ckpt.save_checkpoint(self.checkpoint_path, state)
                ckpt.write_metrics(self.out_dir / ckpt.METRICS_NAME, records)
                for old in self.out_dir.glob(f"{SHARDED_PREFIX}*"):
                    if old.name != name:
                        shutil.rmtree(old)
        dist.barrier()

    def restore(self, run: Run, state: Mapping[str, Any]) -> None:
        """Check the shards' digests (the writer reads them; every process learns the
        verdict), then load every process's shards, the schedule and its generators."""
        directory = self.out_dir / state["sharded"]["directory"]
        problem = None
        if self.is_writer:
            problem = ckpt.shard_problem(directory, state["sharded"]["digests"])
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ckpt.CheckpointError(verdict[0])
        shards = self._shards(run)
        load_sharded(shards, directory)
        load_sharded_state_dict(run.model, run.method.optimizer, shards)
        run.method.load_state_dict(shards["method_state"])
        run.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(shards["rng"][f"rank{self.rank}"])
