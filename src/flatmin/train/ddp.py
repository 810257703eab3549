"""The reference trainer on N processes: ``DistributedTrainer`` and ``run_distributed``.

``flatmin train --nproc N`` starts N local processes (gloo, CPU); under ``torchrun`` the
same command joins the group torchrun describes:

.. code-block:: bash

    flatmin train --nproc 2 --method sam --dataset digits --out runs/x
    torchrun --nproc-per-node 2 -m flatmin.cli train --method saf --out runs/y

What changes on N processes:

* ``--batch-size`` stays the *global* batch: each process takes ``batch_size / N``
  samples per step from a ``DistributedSampler`` (shuffled by ``--seed`` and the epoch).
* The model runs under ``DistributedDataParallel``. Every SAM-family method perturbs
  each process with its own ε (m-sharpness with ``m = batch_size / N``,
  :mod:`flatmin.distributed.sam`); only the final gradient is averaged — for StableSAM,
  GSAM and LookSAM, whose update uses the first-pass gradient, the final *direction*
  each process computes. SAF's store is replicated (:mod:`flatmin.distributed.saf`),
  MESA's teacher kept identical (:mod:`flatmin.distributed.mesa`).
* BatchNorm statistics are identical on every process before evaluation and saving;
  training metrics are averaged over processes (throughput summed) before logging.
* Rank 0 writes the run files after checking that every process holds the same weights;
  on ``--resume`` every process loads rank 0's checkpoint, which records the number of
  processes: a run resumes on as many as it was started with.
* The run directory is locked by the process that started the group (the parent of
  ``--nproc`` workers, or rank 0 under torchrun).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flatmin.data import WithIndex
from flatmin.distributed.collectives import (
    max_replica_difference,
    reduce_metrics,
    sync_norm_statistics,
)
from flatmin.distributed.launch import spawn
from flatmin.distributed.mesa import DistributedMESA
from flatmin.distributed.saf import DistributedSAF
from flatmin.distributed.sam import sam_step
from flatmin.distributed.sharded_saf import ShardedSAF
from flatmin.train import checkpoint as ckpt
from flatmin.train.config import TrainConfig
from flatmin.train.lock import RunLock
from flatmin.train.loop import Trainer
from flatmin.train.method import (
    MESATerm,
    Method,
    PassOutput,
    SAFTerm,
    SinglePassUpdate,
    TwoPassUpdate,
)
from flatmin.trajectory.saf import SAF


class DistributedTwoPassUpdate(TwoPassUpdate):
    """The SAM family's step on a DDP model (see :func:`flatmin.distributed.sam_step`);
    the closure takes the form the optimizer declares (``per_sample_closure``: ESAM's
    per-sample objectives without backward)."""

    def __init__(self, perturbation: str = "local") -> None:
        self.perturbation = perturbation

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, compute) -> PassOutput:
        outputs: list[PassOutput] = []

        def closure() -> torch.Tensor:
            out = compute(not outputs)
            out.objective.backward()
            outputs.append(out)
            return out.objective

        def per_sample_closure(rows: torch.Tensor | None = None) -> torch.Tensor:
            out = compute(not outputs, rows)
            outputs.append(out)
            return out.per_sample

        optimizer.zero_grad(set_to_none=True)
        chosen = per_sample_closure if optimizer.per_sample_closure else closure
        sam_step(optimizer, model, chosen, perturbation=self.perturbation)
        return outputs[0]


def distribute_method(method: Method, *, sharded: bool = False) -> Method:
    """Make ``method`` (in place) correct on several processes; returns it.

    The SAM-family members get :class:`DistributedTwoPassUpdate` with per-process ε
    (their traits tell :func:`~flatmin.distributed.sam_step` how to average), or the
    global ε on a model ``sharded`` by FSDP2. SAF and MESA terms get their distributed
    wrappers (a :class:`~flatmin.distributed.ShardedSAF` store when ``sharded``). An
    unknown update rule or loss term is refused rather than run with a silently wrong
    meaning.
    """
    update = method.update
    if isinstance(update, DistributedTwoPassUpdate):
        pass
    elif isinstance(update, TwoPassUpdate):
        method.update = DistributedTwoPassUpdate("global" if sharded else "local")
    elif type(update) is not SinglePassUpdate:
        raise TypeError(f"no distributed form is known for the update rule {type(update).__name__}")
    for name, term in method.terms.items():
        if isinstance(term, SAFTerm):
            if isinstance(term.saf, SAF):
                term.saf = ShardedSAF.from_saf(term.saf) if sharded else DistributedSAF(term.saf)
        elif isinstance(term, MESATerm):
            if not isinstance(term.mesa, DistributedMESA):
                term.mesa = DistributedMESA(term.mesa)
        else:
            raise TypeError(f"no distributed form is known for the loss term {name!r}")
    return method


class DistributedTrainer(Trainer):
    """:class:`~flatmin.train.loop.Trainer` for one process of an initialized group.

    Every process trains through ``DistributedDataParallel`` on its share of each batch;
    rank 0 writes the run files, and every process resumes from them.
    """

    def __init__(self, config: TrainConfig, out_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(config, out_dir, **kwargs)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: nn.Module, method: Method) -> nn.Module:
        distribute_method(method)
        return DistributedDataParallel(model)

    def make_train_loader(self, dataset: Dataset) -> DataLoader:
        """This process's share: ``batch_size / W`` samples per step."""
        config = self.config
        if config.batch_size % self.world_size:
            raise ValueError(
                f"the batch size {config.batch_size} must be divisible by the number of "
                f"processes {self.world_size} (it is the global batch, split evenly)"
            )
        indexed = WithIndex(dataset)
        sampler = DistributedSampler(indexed, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=config.seed)  # fmt: skip
        return DataLoader(
            indexed,
            batch_size=config.batch_size // self.world_size,
            sampler=sampler,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed),  # the workers' seeds
        )

    def reduce_record(self, model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        """Equal BatchNorm statistics and a replica check, then averaged metrics."""
        sync_norm_statistics(model, "broadcast")
        difference = max_replica_difference([*model.parameters(), *model.buffers()])
        if difference != 0.0:
            raise RuntimeError(
                f"the processes' weights differ by up to {difference:g} after epoch "
                f"{record['epoch']}"
            )
        record.update(reduce_metrics({k: record[k] for k in ("train_loss", "train_acc")}))
        record.update(reduce_metrics({"images_per_s": record["images_per_s"]}, op="sum"))
        return record


def train_in_group(
    rank: int, world_size: int, config: TrainConfig, run_dir: str, resume: bool,
    stop_after: int | None, lock: bool = False,
    epoch_callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    trainer: type[DistributedTrainer] = DistributedTrainer,
) -> list[dict[str, Any]]:  # fmt: skip
    """One process's share of the training (the target of :func:`spawn`); ``lock``: rank 0
    takes the run directory's lock (when no parent process holds it); rank 0 calls
    ``epoch_callbacks``; ``trainer``: the trainer class (the FSDP2 one for ``--fsdp``).
    Returns the records (on every rank)."""
    process = trainer(
        config, run_dir, progress=False, lock=lock,
        epoch_callbacks=epoch_callbacks if rank == 0 else (),
    )  # fmt: skip
    return process.run(resume=resume, stop_after=stop_after)


def run_distributed(
    config: TrainConfig, run_dir: str | Path, nproc: int, *, resume: bool = False,
    stop_after: int | None = None,
    epoch_callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    trainer: type[DistributedTrainer] = DistributedTrainer,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train ``config`` on ``nproc`` local processes with ``trainer`` (the DDP trainer, or
    :class:`~flatmin.train.fsdp.FSDPTrainer`); returns the metrics records.

    This process holds the run directory's lock while the workers train; settings,
    resume and the batch split are checked here, before any process starts.
    ``epoch_callbacks`` run in rank 0's process (so they must be picklable).
    """
    config = config.resolved()
    if config.batch_size % nproc:
        raise ValueError(
            f"--batch-size {config.batch_size} must be divisible by --nproc {nproc} "
            "(it is the global batch, split evenly)"
        )
    with RunLock(run_dir):
        ckpt.resume_state(Path(run_dir), config.to_dict(), resume=resume, world_size=nproc,
                          sharded=trainer.sharded_checkpoint)  # fmt: skip
        spawn(train_in_group, nproc, config, str(run_dir), resume, stop_after, False,
              tuple(epoch_callbacks), trainer)  # fmt: skip
    return ckpt.read_metrics(Path(run_dir) / ckpt.METRICS_NAME)
