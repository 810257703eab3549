"""The reference training loop: any registered method, any dataset, resumable bit-exactly.

:class:`Trainer` builds a run from a :class:`~flatmin.train.config.TrainConfig` — data,
model, the method from the registry, a learning-rate schedule — and trains it epoch by
epoch. After every epoch it evaluates on the test set (and the validation split, if
any), appends a record to the metrics, and atomically rewrites the checkpoint,
``metrics.jsonl`` and ``config.json`` in the run directory (see
:mod:`flatmin.train.checkpoint`), which it holds locked for the whole run
(:mod:`flatmin.train.lock`). An interrupted run therefore leaves the files of its last
complete epoch, and ``Trainer.run(resume=True)`` continues from them exactly as if it
had never stopped: the checkpoint holds the model, optimizer (a SAM-family optimizer's
base state included), scheduler, the method's loss-term state and the global random
generators, and each epoch's data order (and data-loader worker seeds) is a function of
the seed and the epoch alone.

The loop has no per-method branches: each step is ``method.train_step(...)`` and each
epoch starts with ``method.set_epoch(epoch)`` (epochs are 0-based there, as in the SAF
code; the records count completed epochs from 1). A subclass changes where the loop
runs through its hooks — :meth:`Trainer.wrap_model`, :meth:`Trainer.make_train_loader`,
:meth:`Trainer.reduce_record` and :attr:`Trainer.is_writer` (the DDP trainer,
:mod:`flatmin.train.ddp`), and :meth:`Trainer.restore`, :meth:`Trainer.save` and
:attr:`Trainer.run_facts` for a checkpoint of another kind (the FSDP2 trainer's sharded
one, :mod:`flatmin.train.fsdp`).

A run whose weights stop being finite (NaN or inf after an epoch) has diverged: that
epoch's record is written with ``"diverged": true``, the checkpoint keeps the last epoch
whose weights were finite, and training stops.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from flatmin.data import WithIndex
from flatmin.measure import sam_sharpness
from flatmin.train import checkpoint as ckpt
from flatmin.train.config import TrainConfig, lr_factor
from flatmin.train.data import make_loader, set_loader_epoch
from flatmin.train.lock import RunLock
from flatmin.train.method import Method, MethodContext
from flatmin.train.models import build_model
from flatmin.train.registry import get_method


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += y.numel()
    finally:
        model.train(was_training)
    return loss_sum / count, correct / count


def weights_are_finite(model: nn.Module) -> bool:
    """Whether every parameter and floating-point buffer of ``model`` is finite."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the global generator, for code that uses it)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything built for a run, before any state is restored into it."""

    model: nn.Module
    method: Method
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    data_metadata: dict[str, Any]
    sharpness_batch: tuple[Tensor, Tensor] | None

    def state(self, config: Mapping[str, Any], epoch: int, records: list, world_size: int):
        """The checkpoint after ``epoch`` complete epochs (see :mod:`.checkpoint`)."""
        return {
            "model": self.model.state_dict(),
            "config": dict(config),
            "optimizer": self.method.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method_state": self.method.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch": epoch,
            "metrics": records,
            "world_size": world_size,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a checkpoint written by :meth:`state` (RNGs included);
        :class:`~flatmin.train.checkpoint.CheckpointError` when its weights do not fit the
        model."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError:  # missing, unexpected or misshapen entries
            config = state["config"]
            raise ckpt.CheckpointError(
                f"the checkpoint's saved weights do not fit the model {config['model']!r} for "
                f"{config['dataset']} that its configuration names"
            ) from None
        self.method.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method_state"])
        ckpt.set_rng_state(state["rng"])


class Trainer:
    """Train one configuration into ``out_dir``.

    Args:
        config: the run's configuration (checked and completed here).
        out_dir: the run directory (created if needed).
        progress: show tqdm bars per epoch and per batch; ``None``: only on a terminal.
        step_callbacks: called as ``f(epoch, step)`` after every optimizer step.
        epoch_callbacks: called as ``f(record)`` after every saved epoch.
        lock: hold the run directory's lock during :meth:`run` (``False`` when the
            caller holds it, e.g. the parent of several training processes).

    After :meth:`run`, ``trainer.model`` and ``trainer.method`` are the trained objects.

    Example (a short run; the defaults train 20 epochs)::

        config = TrainConfig(method="saf", dataset="digits", epochs=2, subset=256)
        records = Trainer(config, "runs/x", progress=False).run()   # one record per epoch
    """

    world_size = 1  # processes that train together; recorded in the checkpoint
    sharded_checkpoint = False  # whether the checkpoint is a sharded one (FSDP2 trainer)

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        progress: bool | None = None,
        step_callbacks: Sequence[Callable[[int, int], None]] = (),
        epoch_callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
        lock: bool = True,
    ) -> None:
        self.config = config.resolved()
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.step_callbacks = list(step_callbacks)
        self.epoch_callbacks = list(epoch_callbacks)
        self.lock = lock
        self.model: nn.Module | None = None
        self.method: Method | None = None

    # --- hooks -------------------------------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run files (one process of a group does)."""
        return True

    def wrap_model(self, model: nn.Module, method: Method) -> nn.Module:
        """The module the training steps run through (``DistributedDataParallel(model)`` in
        the DDP trainer, which also adapts ``method``), built before a checkpoint's state
        is restored into ``model`` and ``method``; evaluation and checkpoints use
        ``model`` itself."""
        return model

    def restore(self, run: Run, state: Mapping[str, Any]) -> None:
        """Load the checkpoint ``state`` (from :func:`~flatmin.train.checkpoint.resume_state`)
        into the run, random generators included."""
        run.restore(state)

    def save(self, run: Run, config: dict, epoch: int, records: list, keep_checkpoint: bool):
        """Write the run files after ``epoch`` complete epochs (every process calls it;
        here the writer writes ``checkpoint.pt`` and the metrics). ``keep_checkpoint``: a
        diverged epoch keeps the last finite checkpoint and writes the metrics only."""
        if not self.is_writer:
            return
        with ckpt.interrupts_deferred():  # the two files of an epoch go together
            if not keep_checkpoint:
                state = run.state(config, epoch, records, self.world_size)
                ckpt.save_checkpoint(self.checkpoint_path, state)
            ckpt.write_metrics(self.out_dir / ckpt.METRICS_NAME, records)

    @property
    def run_facts(self) -> dict[str, Any]:
        """Facts about how the run is executed, recorded in ``config.json``."""
        return {"world_size": self.world_size}

    def make_train_loader(self, dataset: Dataset) -> DataLoader:
        """The training batches: ``(x, y, index)`` with the samples' dataset positions;
        shuffled by a generator that :meth:`run` reseeds from (seed, epoch) each epoch."""
        config = self.config
        return make_loader(WithIndex(dataset), config.batch_size, shuffle=True,
                           seed=config.seed, num_workers=config.num_workers)  # fmt: skip

    def reduce_record(self, model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        """The epoch's training record as logged (e.g. averaged over processes); called
        after the epoch's last step, before evaluation and saving."""
        return record

    # --- the run -----------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_NAME

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train until ``config.epochs`` (or ``stop_after`` epochs in total) are complete.

        ``resume=True`` continues the checkpoint in ``out_dir``; without it an existing
        checkpoint there is an error (so no run is overwritten by accident). Another
        process holding ``out_dir`` is an error too (:class:`~flatmin.train.lock.RunLocked`).
        Returns the metrics records of all completed epochs.
        """
        holding = self.lock and self.is_writer
        with RunLock(self.out_dir) if holding else nullcontext():
            return self._run(resume, stop_after)

    def _run(self, resume: bool, stop_after: int | None) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm  # optional: the flatmin[train] extra

        config = self.config
        config_dict = config.to_dict()
        state = ckpt.resume_state(self.out_dir, config_dict, resume=resume,
                                  world_size=self.world_size,
                                  sharded=self.sharded_checkpoint)  # fmt: skip
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        run = self._build()
        records: list[dict[str, Any]] = []
        start_epoch = 0
        self.model, self.method = run.model, run.method
        stepped = self.wrap_model(run.model, run.method)
        if state is not None:
            self.restore(run, state)
            records, start_epoch = list(state["metrics"]), int(state["epoch"])

        if self.is_writer:
            config_file = {**config_dict, "data": run.data_metadata, **self.run_facts}
            ckpt.write_json(self.out_dir / ckpt.CONFIG_NAME, config_file)
            ckpt.write_metrics(self.out_dir / ckpt.METRICS_NAME, records)

        end_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
        wall_offset = records[-1]["wall_time"] if records else 0.0
        disable = None if self.progress is None else not self.progress
        started = time.perf_counter()
        run.model.train()
        with tqdm(range(start_epoch, end_epoch), desc=f"{config.method} epochs",
                  initial=start_epoch, total=end_epoch, disable=disable,
                  file=sys.stderr) as epochs:  # fmt: skip
            for epoch in epochs:
                record = self._train_epoch(epoch, run, stepped, disable)
                record = self.reduce_record(run.model, record)
                for split, loader in run.eval_loaders.items():
                    record[f"{split}_loss"], record[f"{split}_acc"] = evaluate(run.model, loader)
                if run.sharpness_batch is not None:
                    record["sharpness"] = float(
                        sam_sharpness(run.model, nn.functional.cross_entropy,
                                      run.sharpness_batch, rho=config.sharpness_rho).value
                    )  # fmt: skip
                record["wall_time"] = wall_offset + time.perf_counter() - started
                diverged = not weights_are_finite(run.model)
                if diverged:
                    record["diverged"] = True
                records.append(record)
                self.save(run, config_dict, epoch + 1, records, keep_checkpoint=diverged)
                epochs.set_postfix(test_acc=f"{record['test_acc']:.4f}")
                for callback in self.epoch_callbacks:
                    callback(record)
                if diverged:
                    break
        return records

    def _build(self) -> Run:
        """Data, model, method, loaders and schedule, each seeded from ``config.seed``."""
        config = self.config
        seed_everything(config.seed)
        bundle = config.load_data()
        seed_everything(config.seed)  # the model's initial weights do not depend on the data
        model = build_model(config.model, bundle.num_classes, bundle.input_shape)
        method = get_method(config.method).create(
            model,
            config.hyperparameters,
            MethodContext(len(bundle.train), bundle.num_classes, seed=config.seed),
        )
        train_loader = self.make_train_loader(bundle.train)
        eval_loaders = {"test": make_loader(bundle.test, config.eval_batch_size, False, 0)}
        if bundle.val is not None:
            eval_loaders["val"] = make_loader(bundle.val, config.eval_batch_size, False, 0)
        return Run(
            model=model,
            method=method,
            train_loader=train_loader,
            eval_loaders=eval_loaders,
            scheduler=torch.optim.lr_scheduler.LambdaLR(
                method.optimizer, lr_factor(config, len(train_loader))
            ),
            criterion=nn.CrossEntropyLoss(reduction="none", label_smoothing=config.label_smoothing),
            data_metadata=bundle.metadata,
            sharpness_batch=first_samples(bundle.train, config.batch_size)
            if config.track_sharpness
            else None,
        )

    def _train_epoch(
        self, epoch: int, run: Run, model: nn.Module, disable: bool | None
    ) -> dict[str, Any]:
        """One epoch of steps through ``model`` (the wrapped model)."""
        from tqdm.auto import tqdm  # optional: the flatmin[train] extra

        method = run.method
        method.set_epoch(epoch)
        set_loader_epoch(run.train_loader, self.config.seed, epoch)
        lr = method.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        seen = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        with tqdm(run.train_loader, desc=f"epoch {epoch + 1}", leave=False, disable=disable,
                  file=sys.stderr) as batches:  # fmt: skip
            for step, (x, y, index) in enumerate(batches):
                out = method.train_step(model, x, y, index, run.criterion)
                run.scheduler.step()
                loss_sum += out.loss.double() * y.numel()
                correct += (out.logits.argmax(1) == y).sum()
                seen += y.numel()
                for callback in self.step_callbacks:
                    callback(epoch, step)
        elapsed = time.perf_counter() - started
        cpu_elapsed = time.process_time() - cpu_started
        return {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / seen,
            "train_acc": int(correct) / seen,
            "lr": lr,
            "images_per_s": seen / elapsed,
            # CPU seconds of this process: unlike wall time, barely moved by other load.
            "images_per_cpu_s": seen / max(cpu_elapsed, 1e-9),
        }


def first_samples(dataset: Dataset, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of ``dataset`` as one batch ``(x, y)`` (fetched without
    touching the global random generators)."""
    n = min(n, len(dataset))
    with torch.random.fork_rng(devices=[]):
        items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def divergence_message(checkpoint: Path, epoch: int) -> str:
    """What a run that diverged in ``epoch`` (counted from 1) left behind."""
    kept = f"{checkpoint} keeps epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
    return f"diverged: the weights are not finite after epoch {epoch}; training stopped, {kept}"
