"""The reference trainer on N processes: ``python -m flatmin.distributed.train --nproc N``.

Takes every flag of ``flatmin train`` plus ``--nproc``; or, under torchrun (which sets
``WORLD_SIZE``), the same flags without ``--nproc``::

    python -m flatmin.distributed.train --nproc 2 --method sam --dataset digits --out runs/x
    torchrun --nproc-per-node 2 -m flatmin.distributed.train --method saf --out runs/y

What changes on N processes (gloo backend, CPU):

* ``--batch-size`` stays the *global* batch: each process takes ``batch_size / N``
  samples per step from a ``DistributedSampler`` (shuffled by ``--seed`` and the epoch),
  so the number of steps per epoch and the learning-rate schedule are those of the
  single-process run.
* The model runs under ``DistributedDataParallel``. Every SAM-family method perturbs
  each process with its own ε (m-sharpness with ``m = batch_size / N``,
  :mod:`flatmin.distributed.sam`); only the final gradient is averaged — for StableSAM,
  GSAM and LookSAM, whose update uses the first-pass gradient, the final *direction*
  each process computes. SAF's store is replicated
  (:mod:`flatmin.distributed.saf`), MESA's teacher kept identical
  (:mod:`flatmin.distributed.mesa`).
* BatchNorm statistics are identical on every process before evaluation and saving;
  training metrics are averaged over processes (throughput summed) before logging.
* Rank 0 writes the run files after checking that every process holds the same weights;
  the other processes write nothing to the run directory, and on ``--resume`` every
  process loads rank 0's checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from flatmin.distributed.collectives import (
    max_replica_difference,
    reduce_metrics,
    sync_norm_statistics,
)
from flatmin.distributed.launch import init_from_env, spawn
from flatmin.distributed.mesa import DistributedMESA
from flatmin.distributed.saf import DistributedSAF
from flatmin.distributed.sam import sam_step
from flatmin.train import checkpoint as ckpt
from flatmin.train.loop import TrainConfig, Trainer
from flatmin.train.registry import (
    MESATerm,
    Method,
    PassOutput,
    SAFTerm,
    SinglePassUpdate,
    TwoPassUpdate,
)


class DistributedTwoPassUpdate(TwoPassUpdate):
    """The SAM family's step on a DDP model (see :func:`flatmin.distributed.sam.sam_step`);
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


def distribute_method(method: Method) -> Method:
    """Make ``method`` (in place) correct on several processes; returns it.

    The SAM-family members get :class:`DistributedTwoPassUpdate` with per-process ε
    (their traits tell :func:`~flatmin.distributed.sam.sam_step` how to average). SAF and
    MESA terms get their distributed wrappers. An unknown update rule or loss term is
    refused rather than run with a silently wrong meaning.
    """
    update = method.update
    if isinstance(update, DistributedTwoPassUpdate):
        pass
    elif isinstance(update, TwoPassUpdate):
        method.update = DistributedTwoPassUpdate("local")
    elif type(update) is not SinglePassUpdate:
        raise TypeError(f"no distributed form is known for the update rule {type(update).__name__}")
    for name, term in method.terms.items():
        if isinstance(term, SAFTerm):
            if not isinstance(term.saf, DistributedSAF):
                term.saf = DistributedSAF(term.saf)
        elif isinstance(term, MESATerm):
            if not isinstance(term.mesa, DistributedMESA):
                term.mesa = DistributedMESA(term.mesa)
        else:
            raise TypeError(f"no distributed form is known for the loss term {name!r}")
    return method


def distributed_loader(loader: DataLoader, seed: int) -> DataLoader:
    """This process's share of ``loader``: same dataset, ``batch_size / W`` per step."""
    size, rank = dist.get_world_size(), dist.get_rank()
    if loader.batch_size % size:
        raise ValueError(
            f"the batch size {loader.batch_size} must be divisible by the number of "
            f"processes {size} (it is the global batch, split evenly)"
        )
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size // size,
        sampler=sampler,
        num_workers=loader.num_workers,
        drop_last=loader.drop_last,
        persistent_workers=loader.num_workers > 0,
    )


class DistributedTrainer(Trainer):
    """:class:`flatmin.train.loop.Trainer` for one process of a group.

    ``run_dir`` is the run directory; rank 0 writes there, the others write into their
    own ``out_dir`` (a scratch directory) and resume from ``run_dir``'s checkpoint.
    It overrides two of the Trainer's internal steps (``_checkpoint_to_resume`` and
    ``_train_epoch``); public hooks in the Trainer for the loader, the model wrapper and
    the writing rank would let it stop depending on them.
    """

    def __init__(
        self, config: TrainConfig, out_dir: str | Path, run_dir: str | Path, **kwargs: Any
    ):
        super().__init__(config, out_dir, **kwargs)
        self.run_dir = Path(run_dir)
        self._ddp: DistributedDataParallel | None = None
        self._loader: DataLoader | None = None

    def _checkpoint_to_resume(self, resume: bool) -> dict[str, Any] | None:
        if dist.get_rank() == 0 or not resume:
            return super()._checkpoint_to_resume(resume)
        return ckpt.load_checkpoint(self.run_dir / ckpt.CHECKPOINT_NAME)

    def _train_epoch(self, epoch, model, method, loader, scheduler, criterion, disable):
        if self._ddp is None:  # first epoch of this process: everything is loaded by now
            self._ddp = DistributedDataParallel(model)
            distribute_method(method)
            self._loader = distributed_loader(loader, self.config.seed)
        self._loader.sampler.set_epoch(epoch)
        record = super()._train_epoch(
            epoch, self._ddp, method, self._loader, scheduler, criterion, disable
        )
        sync_norm_statistics(model, "broadcast")
        difference = max_replica_difference([*model.parameters(), *model.buffers()])
        if difference != 0.0:
            raise RuntimeError(
                f"the processes' weights differ by up to {difference:g} after epoch {epoch + 1}"
            )
        record.update(
            reduce_metrics({"train_loss": record["train_loss"], "train_acc": record["train_acc"]})
        )
        record.update(reduce_metrics({"images_per_s": record["images_per_s"]}, op="sum"))
        return record


def train_in_group(
    rank: int, world_size: int, config: TrainConfig, run_dir: str, resume: bool,
    stop_after: int | None, quiet: bool,
) -> None:  # fmt: skip
    """Run one process's share of the training (the target of :func:`spawn`)."""
    with tempfile.TemporaryDirectory(prefix=f"flatmin-rank{rank}-") as scratch:
        out_dir = run_dir if rank == 0 else scratch
        log = _echo if rank == 0 and not quiet else None
        trainer = DistributedTrainer(config, out_dir, run_dir, progress=False, log=log)
        trainer.run(resume=resume, stop_after=stop_after)


def run_distributed(
    config: TrainConfig, run_dir: str | Path, nproc: int, *, resume: bool = False,
    stop_after: int | None = None, quiet: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train ``config`` on ``nproc`` local processes; returns the metrics records."""
    config = config.resolved()
    if config.batch_size % nproc:
        raise ValueError(
            f"--batch-size {config.batch_size} must be divisible by --nproc {nproc} "
            "(it is the global batch, split evenly)"
        )
    Trainer(config, run_dir)._checkpoint_to_resume(resume)  # fail here, before spawning
    spawn(train_in_group, nproc, config, str(run_dir), resume, stop_after, quiet)
    return ckpt.read_metrics(Path(run_dir) / ckpt.METRICS_NAME)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flatmin.distributed.train``: ``flatmin train``'s flags plus ``--nproc``."""
    from flatmin.train import command

    parser = argparse.ArgumentParser(
        prog="python -m flatmin.distributed.train", description=__doc__.splitlines()[0]
    )
    command.configure(parser)  # includes --nproc; here it is required outside torchrun
    parser.set_defaults(nproc=None)
    args = parser.parse_args(argv)
    try:
        config, out = command.build_config(args)
        if "WORLD_SIZE" in os.environ and args.nproc is None:
            nproc, records = _run_under_torchrun(config, out, args)
        elif args.nproc is None or args.nproc < 1:
            raise ValueError(
                "--nproc N (a positive number of processes) is required outside torchrun"
            )
        else:
            nproc = args.nproc
            records = run_distributed(
                config, out, nproc, resume=args.resume, stop_after=args.stop_after, quiet=args.quiet
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"flatmin train: error: {err}", file=sys.stderr)
        return 2
    if records:
        last = records[-1]
        print(
            f"{config.method} on {nproc} processes: test accuracy {last['test_acc']:.4f} "
            f"after epoch {last['epoch']}/{config.epochs}; run files in {out}"
        )
    return 0


def _run_under_torchrun(
    config: TrainConfig, out: Path, args: argparse.Namespace
) -> tuple[int, list[dict[str, Any]]]:
    """This process's share under torchrun; the records on rank 0 (none elsewhere)."""
    rank, nproc = init_from_env()
    try:
        train_in_group(
            rank, nproc, config.resolved(), str(out), args.resume, args.stop_after, args.quiet
        )
    finally:
        dist.destroy_process_group()
    return nproc, ckpt.read_metrics(Path(out) / ckpt.METRICS_NAME) if rank == 0 else []


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
