"""What defines a training run: :class:`TrainConfig`, its checks and its schedule.

A configuration is checked once (:meth:`TrainConfig.resolved`), stored flat in the
checkpoint and in ``config.json`` (:meth:`TrainConfig.to_dict`), and compared with the
stored one when a run is resumed (:func:`resume_conflicts`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flatmin.optim._checks import check_choice, check_int, check_real
from flatmin.train.data import DATASETS, DatasetBundle, load_dataset
from flatmin.train.models import MODELS
from flatmin.train.registry import get_method

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
        """A checked copy with the model and every hyperparameter filled in.

        ``ValueError`` (``TypeError`` for a value of the wrong kind) names the setting,
        what it expects and what it got.
        """
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
        epochs = check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_int("num_workers", self.num_workers, minimum=0)
        check_int("warmup_epochs", self.warmup_epochs, minimum=0, maximum=epochs - 1)
        if self.subset is not None:
            check_int("subset", self.subset, minimum=1)
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        for name in ("label_noise", "val_fraction", "label_smoothing"):
            check_real(name, getattr(self, name), minimum=0.0, maximum=1.0, exclusive_maximum=True)
        check_real("step_gamma", self.step_gamma, minimum=0.0, exclusive_minimum=True,
                   hint="the factor the learning rate is multiplied by")  # fmt: skip
        check_real("sharpness_rho", self.sharpness_rho, minimum=0.0, exclusive_minimum=True)
        for milestone in self.step_milestones:
            check_real("step_milestones", milestone, minimum=0.0, maximum=1.0,
                       exclusive_minimum=True, exclusive_maximum=True,
                       hint="fractions of training")  # fmt: skip
        for name in ("augment", "track_sharpness"):
            check_choice(name, getattr(self, name), (True, False))
        return dataclasses.replace(
            self,
            model=model,
            step_milestones=tuple(float(m) for m in self.step_milestones),
            hyperparameters=spec.resolve(self.hyperparameters),
        )

    def load_data(self, *, augment: bool | None = None) -> DatasetBundle:
        """The run's datasets, split and noised exactly as training sees them; ``augment``
        overrides the configuration (``False`` to measure)."""
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
        names = flat.pop("hyperparameter_names", None)
        if names is None:
            raise ValueError("not a flatmin run configuration (no 'hyperparameter_names')")
        hyperparameters = {name: flat.pop(name) for name in names}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        flat["step_milestones"] = tuple(flat["step_milestones"])
        return cls(**flat, hyperparameters=hyperparameters)


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
