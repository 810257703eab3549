"""The reference training loop: any registered method, any dataset, resumable bit-exactly.

:class:`Trainer` builds a run from a :class:`TrainConfig` — data, model, the method from
the registry, a learning-rate schedule — and trains it epoch by epoch. After every epoch
it evaluates on the test set (and the validation split, if any), appends a record to the
metrics, and atomically rewrites the checkpoint, ``metrics.jsonl`` and ``config.json``
in the run directory (see :mod:`flatmin.train.checkpoint`). An interrupted run therefore
leaves the files of its last complete epoch, and ``Trainer.run(resume=True)`` continues
from them exactly as if it had never stopped: the checkpoint holds the model, optimizer
(a SAM-family optimizer's base state included), scheduler, the method's loss-term state
and every random generator the loop draws from.

The loop has no per-method branches: each step is ``method.train_step(...)`` and each
epoch starts with ``method.set_epoch(epoch)`` (epochs are 0-based there, as in the SAF
code; the records count completed epochs from 1).

A run whose weights stop being finite (NaN or inf after an epoch) has diverged: that
epoch's record is written with ``"diverged": true``, the checkpoint keeps the last epoch
whose weights were finite, and training stops.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from flatmin.train import checkpoint as ckpt
from flatmin.train.registry import Method, MethodContext, get_method

DEFAULT_MODELS = {
    "mnist1d": "cnn1d",
    "digits": "mlp",
    "fashion-mnist": "cnn",
    "cifar10": "resnet18",
    "cifar100": "resnet18",
}
SCHEDULES = ("cosine", "step", "constant")
# Keys of the configuration that may differ when a run is resumed: they change how the
# run is executed or reported, not what it computes.
RUN_CONTROL_KEYS = ("threads",)


@dataclass
class TrainConfig:
    """Everything that defines a training run (``hyperparameters`` are the method's own)."""

    method: str = "sgd"
    dataset: str = "mnist1d"
    model: str | None = None  # None: DEFAULT_MODELS[dataset]
    data_dir: str | None = None
    epochs: int = 20
    batch_size: int = 128
    eval_batch_size: int = 1000
    seed: int = 0
    label_noise: float = 0.0
    val_fraction: float = 0.0
    augment: bool = True
    subset: int | None = None
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    step_milestones: tuple[float, ...] = (0.5, 0.75)
    step_gamma: float = 0.1
    num_workers: int = 0
    track_sharpness: bool = False
    sharpness_rho: float = 0.05
    threads: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A checked copy with the model and every hyperparameter filled in."""
        from flatmin.train.data import DATASETS
        from flatmin.train.models import MODELS

        spec = get_method(self.method)
        if self.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}"
            )
        model = self.model if self.model is not None else DEFAULT_MODELS[self.dataset]
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; valid models: {', '.join(MODELS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(SCHEDULES)}"
            )
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"
        )
        _require(
            0.0 <= self.label_smoothing < 1.0,
            f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        _require(
            0 <= self.warmup_epochs < self.epochs,
            f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}",
        )
        _require(
            all(0.0 < m < 1.0 for m in self.step_milestones),
            f"step_milestones are fractions of training in (0, 1), got {self.step_milestones}",
        )
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1: {self.threads}")
        return dataclasses.replace(
            self,
            model=model,
            step_milestones=tuple(float(m) for m in self.step_milestones),
            hyperparameters=spec.resolve(self.hyperparameters),
        )

    def load_data(self, *, augment: bool | None = None) -> Any:
        """The run's :class:`~flatmin.train.data.DatasetBundle`, split and noised exactly as
        training sees it; ``augment`` overrides the configuration (``False`` to measure)."""
        from flatmin.train.data import load_dataset

        return load_dataset(
            self.dataset,
            self.data_dir,
            seed=self.seed,
            label_noise=self.label_noise,
            val_fraction=self.val_fraction,
            augment=self.augment if augment is None else augment,
            subset=self.subset,
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat form stored in checkpoints and ``config.json``: the method's
        hyperparameters sit beside the run's own settings."""
        flat = dataclasses.asdict(self)
        hyperparameters = flat.pop("hyperparameters")
        flat["step_milestones"] = list(flat["step_milestones"])
        clash = set(flat) & set(hyperparameters)
        if clash:
            raise ValueError(f"hyperparameters {sorted(clash)} clash with run settings")
        return {**flat, **hyperparameters, "hyperparameter_names": sorted(hyperparameters)}

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        flat = dict(flat)
        names = flat.pop("hyperparameter_names")
        hyperparameters = {name: flat.pop(name) for name in names}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        flat["step_milestones"] = tuple(flat["step_milestones"])
        return cls(**flat, hyperparameters=hyperparameters)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def resume_conflicts(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Why a run configured as ``requested`` cannot continue a checkpoint of ``stored``.

    Method, model and dataset get a sentence each; any other differing setting is listed,
    since continuing with it would no longer be the run that was started.
    """
    reasons = []
    for key in ("method", "model", "dataset"):
        if stored.get(key) != requested.get(key):
            reasons.append(
                f"the checkpoint was trained with {key} {stored.get(key)!r}, "
                f"not {requested.get(key)!r}"
            )
    others = sorted(
        k
        for k in set(stored) | set(requested)
        if k not in ("method", "model", "dataset", *RUN_CONTROL_KEYS)
        and stored.get(k) != requested.get(k)
    )
    if others and not reasons:
        reasons.append(
            "settings differ from the checkpoint's: "
            + ", ".join(f"{k} {stored.get(k)!r} → {requested.get(k)!r}" for k in others)
            + " (a resumed run keeps its settings; start a new --out to change them)"
        )
    return reasons


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule as a multiplier of the peak learning rate after ``step`` steps.

    Linear warm-up over ``warmup_epochs``, then ``cosine``: ``½(1 + cos(π·t))`` with ``t``
    the fraction of the post-warm-up steps done (Loshchilov & Hutter, SGDR, without
    restarts); ``step``: ``step_gamma`` to the power of the number of ``step_milestones``
    (fractions of all epochs) passed, counted in whole epochs; ``constant``: 1.
    """
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    milestones = [round(m * config.epochs) * steps_per_epoch for m in config.step_milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if config.schedule == "step":
            return config.step_gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


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
class _Run:
    """Everything built for a run, before any state is restored into it."""

    model: nn.Module
    method: Method
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    data_metadata: dict[str, Any]
    sharpness_batch: tuple[Tensor, Tensor] | None

    def state(self, config: Mapping[str, Any], epoch: int, records: list) -> dict[str, Any]:
        """The checkpoint after ``epoch`` complete epochs (see :mod:`.checkpoint`)."""
        return {
            "model": self.model.state_dict(),
            "config": dict(config),
            "optimizer": self.method.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method_state": self.method.state_dict(),
            "rng": ckpt.rng_state(self.train_loader.generator),
            "epoch": epoch,
            "metrics": records,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a checkpoint written by :meth:`state` (RNGs included)."""
        self.model.load_state_dict(state["model"])
        self.method.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method_state"])
        ckpt.set_rng_state(state["rng"], self.train_loader.generator)


class Trainer:
    """Train one configuration into ``out_dir``.

    Args:
        config: the run's configuration (checked and completed here).
        out_dir: the run directory (created if needed).
        progress: show tqdm bars per epoch and per batch; ``None``: only on a terminal.
        log: receives one summary line per epoch (``None``: silent).
        step_callbacks: called as ``f(epoch, step)`` after every optimizer step.
        epoch_callbacks: called as ``f(record)`` after every saved epoch.

    After :meth:`run`, ``trainer.model`` and ``trainer.method`` are the trained objects.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
        step_callbacks: Sequence[Callable[[int, int], None]] = (),
        epoch_callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        self.config = config.resolved()
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.log = log
        self.step_callbacks = list(step_callbacks)
        self.epoch_callbacks = list(epoch_callbacks)
        self.model: nn.Module | None = None
        self.method: Method | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_NAME

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train until ``config.epochs`` (or ``stop_after`` epochs in total) are complete.

        ``resume=True`` continues the checkpoint in ``out_dir``; without it an existing
        checkpoint there is an error (so no run is overwritten by accident). Returns the
        metrics records of all completed epochs.
        """
        config = self.config
        state = self._checkpoint_to_resume(resume)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        run = self._build()
        records: list[dict[str, Any]] = []
        start_epoch = 0
        if state is not None:
            run.restore(state)
            records, start_epoch = list(state["metrics"]), int(state["epoch"])
        self.model, self.method = run.model, run.method

        config_dict = config.to_dict()
        ckpt.write_json(self.out_dir / ckpt.CONFIG_NAME, {**config_dict, "data": run.data_metadata})
        ckpt.write_metrics(self.out_dir / ckpt.METRICS_NAME, records)

        from tqdm.auto import tqdm

        end_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
        wall_offset = records[-1]["wall_time"] if records else 0.0
        disable = None if self.progress is None else not self.progress
        started = time.perf_counter()
        run.model.train()
        with tqdm(range(start_epoch, end_epoch), desc=f"{config.method} epochs",
                  initial=start_epoch, total=end_epoch, disable=disable,
                  file=sys.stderr) as epochs:  # fmt: skip
            for epoch in epochs:
                record = self._train_epoch(
                    epoch, run.model, run.method, run.train_loader, run.scheduler,
                    run.criterion, disable,
                )  # fmt: skip
                for split, loader in run.eval_loaders.items():
                    record[f"{split}_loss"], record[f"{split}_acc"] = evaluate(run.model, loader)
                if run.sharpness_batch is not None:
                    record["sharpness"] = self._sharpness(run.model, run.sharpness_batch)
                record["wall_time"] = wall_offset + time.perf_counter() - started
                diverged = not weights_are_finite(run.model)
                if diverged:
                    record["diverged"] = True
                records.append(record)
                with ckpt.interrupts_deferred():  # the two files of an epoch go together
                    if not diverged:  # else the last finite epoch's checkpoint stays
                        ckpt.save_checkpoint(
                            self.checkpoint_path, run.state(config_dict, epoch + 1, records)
                        )
                    ckpt.write_metrics(self.out_dir / ckpt.METRICS_NAME, records)
                epochs.set_postfix(test_acc=f"{record['test_acc']:.4f}")
                if self.log is not None:
                    self.log(_summary(record, config.epochs))
                for callback in self.epoch_callbacks:
                    callback(record)
                if diverged:
                    if self.log is not None:
                        self.log(divergence_message(self.checkpoint_path, epoch + 1))
                    break
        return records

    def _build(self) -> _Run:
        """Data, model, method, loaders and schedule, each seeded from ``config.seed``."""
        from flatmin.data import WithIndex
        from flatmin.train.data import make_loader
        from flatmin.train.models import build_model

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
        train_loader = make_loader(
            WithIndex(bundle.train),
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            num_workers=config.num_workers,
        )
        eval_loaders = {"test": make_loader(bundle.test, config.eval_batch_size, False, 0)}
        if bundle.val is not None:
            eval_loaders["val"] = make_loader(bundle.val, config.eval_batch_size, False, 0)
        return _Run(
            model=model,
            method=method,
            train_loader=train_loader,
            eval_loaders=eval_loaders,
            scheduler=torch.optim.lr_scheduler.LambdaLR(
                method.optimizer, lr_factor(config, len(train_loader))
            ),
            criterion=nn.CrossEntropyLoss(reduction="none", label_smoothing=config.label_smoothing),
            data_metadata=bundle.metadata,
            sharpness_batch=(
                self._sharpness_batch(bundle.train) if config.track_sharpness else None
            ),
        )

    def _checkpoint_to_resume(self, resume: bool) -> dict[str, Any] | None:
        if not resume:
            if self.checkpoint_path.exists():
                raise ValueError(
                    f"{self.out_dir} already holds a run ({self.checkpoint_path.name}); "
                    "continue it with --resume or choose another --out"
                )
            return None
        state = ckpt.load_checkpoint(self.checkpoint_path)
        reasons = resume_conflicts(state["config"], self.config.to_dict())
        if reasons:
            raise ValueError(f"cannot resume {self.out_dir}: " + "; ".join(reasons))
        return state

    def _train_epoch(
        self,
        epoch: int,
        model: nn.Module,
        method: Method,
        loader: DataLoader,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        criterion: nn.Module,
        disable: bool | None,
    ) -> dict[str, Any]:
        """One epoch of steps; ``flatmin.distributed.train`` overrides it to substitute a
        DDP-wrapped model and a distributed loader, so its signature is kept stable."""
        from tqdm.auto import tqdm

        method.set_epoch(epoch)
        lr = method.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        seen = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        with tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=disable,
                  file=sys.stderr) as batches:  # fmt: skip
            for step, (x, y, index) in enumerate(batches):
                out = method.train_step(model, x, y, index, criterion)
                scheduler.step()
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

    def _sharpness_batch(self, dataset: Any) -> tuple[Tensor, Tensor]:
        """A fixed batch of the first training samples (drawn without touching the RNG)."""
        n = min(self.config.batch_size, len(dataset))
        with torch.random.fork_rng(devices=[]):
            items = [dataset[i] for i in range(n)]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def _sharpness(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> float:
        from flatmin.measure import sam_sharpness

        result = sam_sharpness(
            model, nn.functional.cross_entropy, batch, rho=self.config.sharpness_rho
        )
        return float(result.value)


def divergence_message(checkpoint: Path, epoch: int) -> str:
    """What a run that diverged in ``epoch`` (counted from 1) left behind."""
    kept = f"{checkpoint} keeps epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
    return f"diverged: the weights are not finite after epoch {epoch}; training stopped, {kept}"


def _summary(record: Mapping[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "val_acc", "sharpness"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"lr {record['lr']:.4g}")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return "  ".join(parts)
