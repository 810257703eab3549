"""``flatmin train``: train any registered method on a dataset, resumably.

Example:

.. code-block:: bash

    flatmin train --method saf --dataset fashion-mnist --model cnn --epochs 20 --seed 0 \\
        --out runs/saf-fmnist

writes ``runs/saf-fmnist/{config.json, metrics.jsonl, checkpoint.pt}`` after every
epoch; ``flatmin train --out runs/saf-fmnist --resume`` continues an interrupted run
bit-exactly. Every method hyperparameter has a flag generated from the registry; a flag
left out takes the method's paper default.

``--nproc N`` trains on N local processes (:mod:`flatmin.train.ddp`); with ``--fsdp``
the model, optimizer state, SAF store and MESA teacher are sharded across them
(:mod:`flatmin.train.fsdp`). Under ``torchrun`` (which sets ``WORLD_SIZE``) the command
joins torchrun's group instead, on one machine or several:

.. code-block:: bash

    torchrun --nproc-per-node 2 -m flatmin.cli train --method saf --out runs/y
    torchrun --nnodes 2 --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        --rdzv-id RUN -m flatmin.cli train --fsdp --method sam --out runs/z

Bad settings, a run directory in use or unusable, and unreadable checkpoints end the
command with one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from flatmin.cli._out import check_out
from flatmin.distributed.launch import init_from_env, leave_group
from flatmin.train import checkpoint as ckpt
from flatmin.train.config import DEFAULT_MODELS, SCHEDULES, TrainConfig, resume_conflicts
from flatmin.train.ddp import DistributedTrainer, run_distributed, train_in_group
from flatmin.train.loop import Trainer, divergence_message
from flatmin.train.registry import METHODS, all_hyperparameters

_DEFAULTS = TrainConfig()

# Run settings: TrainConfig field → (argparse keyword arguments, help text).
_SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "method": ({"metavar": "NAME"}, "training method: " + ", ".join(METHODS)),
    "dataset": ({"metavar": "NAME"}, "mnist1d, fashion-mnist, digits, cifar10 or cifar100"),
    "model": (
        {"metavar": "NAME"},
        "mlp, cnn1d, cnn, resnet18, wrn16_4 or wrn28_10 (default: per dataset, "
        + ", ".join(f"{d} → {m}" for d, m in DEFAULT_MODELS.items())
        + ")",
    ),
    "data_dir": ({"metavar": "DIR"}, "where the dataset's files are (or are cached)"),
    "epochs": ({"type": int}, "number of epochs"),
    "batch_size": ({"type": int}, "training batch size"),
    "eval_batch_size": ({"type": int}, "evaluation batch size"),
    "seed": ({"type": int}, "seed of the model, data order and label noise"),
    "label_noise": ({"type": float}, "fraction of training labels flipped (symmetric)"),
    "val_fraction": ({"type": float}, "fraction of training data held out for validation"),
    "augment": ({"action": argparse.BooleanOptionalAction}, "random crop + flip (CIFAR)"),
    "subset": ({"type": int}, "train on a random subset of this many samples"),
    "label_smoothing": ({"type": float}, "label smoothing of the cross-entropy"),
    "schedule": ({"choices": SCHEDULES}, "learning-rate schedule"),
    "warmup_epochs": ({"type": int}, "linear learning-rate warm-up epochs"),
    "step_milestones": (
        {"type": float, "nargs": "+", "metavar": "FRACTION"},
        "step schedule: fractions of training where the LR is multiplied by --step-gamma",
    ),
    "step_gamma": ({"type": float}, "step schedule's LR factor"),
    "num_workers": ({"type": int}, "data-loader worker processes"),
    "track_sharpness": (
        {"action": argparse.BooleanOptionalAction},
        "log SAM sharpness L(w+ε)−L(w) on a fixed training batch each epoch",
    ),
    "sharpness_rho": ({"type": float}, "ρ of the tracked sharpness"),
    "threads": ({"type": int}, "torch intra-op threads (default: torch's choice)"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``flatmin train``'s arguments: run settings, method hyperparameters, run control."""
    parser.description = __doc__.splitlines()[0]
    settings = parser.add_argument_group("run settings")
    for name, (kwargs, help_text) in _SETTINGS.items():
        default = getattr(_DEFAULTS, name)
        if isinstance(default, tuple):
            default = " ".join(map(str, default))
        shown = "" if default is None or "default:" in help_text else f" (default: {default})"
        settings.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, help=help_text + shown, **kwargs
        )

    methods = parser.add_argument_group(
        "method hyperparameters", "each method's paper default is used unless given"
    )
    for name, declared in all_hyperparameters().items():
        _, first = declared[0]
        defaults = _describe_defaults([(method, h.default) for method, h in declared])
        kwargs: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if first.kind is bool
            else {"type": first.kind, "metavar": first.kind.__name__.upper()}
        )
        methods.add_argument(
            first.flag,
            dest=f"hp_{name}",
            default=None,
            help=f"{first.help} (default: {defaults})",
            **kwargs,
        )

    control = parser.add_argument_group("run control")
    control.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default: runs/METHOD-DATASET-MODEL-sSEED)",
    )
    control.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (same method, model and data)",
    )
    control.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCHS",
        help="stop once this many epochs are complete (continue later with --resume)",
    )
    control.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only on a terminal)",
    )
    control.add_argument("--quiet", action="store_true", help="no per-epoch summary lines")
    control.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N local processes (torch.distributed, gloo); --batch-size stays "
        "global (default: 1, or torchrun's group under torchrun)",
    )
    control.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model, optimizer state, SAF store and MESA teacher across the "
        "processes (FSDP2; SAM-family methods then perturb with the global ε) and write "
        "sharded checkpoints; needs --nproc N >= 2 or torchrun",
    )


def _describe_defaults(pairs: list[tuple[str, Any]]) -> str:
    """``0.1; adamw 0.001``: the most common default first, then each exception."""
    values = [value for _, value in pairs]
    common = max(values, key=values.count)
    exceptions = [f"{method} {value}" for method, value in pairs if value != common]
    if len(pairs) == 1:
        return f"{pairs[0][0]} {common}"
    return "; ".join([str(common), *exceptions])


def _given(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run settings and hyperparameters the user gave explicitly."""
    settings = {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}
    if "step_milestones" in settings:
        settings["step_milestones"] = tuple(settings["step_milestones"])
    hyper = {
        k.removeprefix("hp_"): v
        for k, v in vars(args).items()
        if k.startswith("hp_") and v is not None
    }
    return settings, hyper


def _stored_config(out: Path) -> dict[str, Any]:
    """The configuration of the run in ``out`` (from its config.json)."""
    path = out / ckpt.CONFIG_NAME
    if not (out / ckpt.CHECKPOINT_NAME).is_file() or not path.is_file():
        raise FileNotFoundError(
            f"--resume: no run to continue in {out} (expected {ckpt.CHECKPOINT_NAME} and "
            f"{ckpt.CONFIG_NAME}, written after the first complete epoch)"
        )
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"--resume: {path} is not JSON; is {out} a flatmin run?") from None
    for key in ("data", "world_size", "fsdp"):  # facts about the run, not settings
        stored.pop(key, None)
    return stored


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run's configuration and directory from the parsed arguments."""
    settings, hyper = _given(args)
    if not args.resume:
        config = TrainConfig(**settings, hyperparameters=hyper).resolved()
        default_out = f"runs/{config.method}-{config.dataset}-{config.model}-s{config.seed}"
        return config, Path(args.out if args.out is not None else default_out)
    if args.out is None:
        raise ValueError("--resume needs --out DIR, the run directory to continue")
    out = Path(args.out)
    stored = _stored_config(out)
    requested = {**stored, **settings, **hyper}
    if "step_milestones" in settings:
        requested["step_milestones"] = list(settings["step_milestones"])
    reasons = resume_conflicts(stored, requested)
    if reasons:
        raise ValueError(f"cannot resume {out}: " + "; ".join(reasons))
    return TrainConfig.from_dict(requested), out


def run(args: argparse.Namespace) -> int:
    out: Path | None = None
    try:
        config, out = build_config(args)
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
        if args.nproc is not None and args.nproc < 1:
            raise ValueError(f"--nproc must be a positive number of processes, got {args.nproc}")
        under_torchrun = args.nproc is None and "WORLD_SIZE" in os.environ
        if args.fsdp and not under_torchrun and (args.nproc or 1) < 2:
            raise ValueError(
                "--fsdp shards the model across processes: give --nproc N with N >= 2, or "
                "run the command under torchrun"
            )
        trainer_class: type[DistributedTrainer] = DistributedTrainer
        if args.fsdp:
            # Imported here: torch.distributed.checkpoint costs a second at every start.
            from flatmin.train.fsdp import FSDPTrainer

            FSDPTrainer.check_config(config)
            trainer_class = FSDPTrainer
        check_out(out)
        log = None if args.quiet else functools.partial(print_summary, epochs=config.epochs)
        if under_torchrun:
            records = _run_under_torchrun(config, out, args, log, trainer_class)
        elif (args.nproc or 1) > 1:
            records = run_distributed(config, out, args.nproc, resume=args.resume,
                                      stop_after=args.stop_after,
                                      epoch_callbacks=() if log is None else (log,),
                                      trainer=trainer_class)  # fmt: skip
        else:
            trainer = Trainer(config, out, progress=args.progress,
                              epoch_callbacks=() if log is None else (log,))  # fmt: skip
            records = trainer.run(resume=args.resume, stop_after=args.stop_after)
    except (ValueError, TypeError, OSError) as err:
        print(f"flatmin train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if out is None:
            raise
        done = _completed_epochs(out)
        print(
            f"interrupted: {out} keeps the last complete epoch ({done}); continue with "
            f"`flatmin train --out {out} --resume`",
            file=sys.stderr,
        )
        return 130
    if not records:  # a process of a torchrun group other than rank 0
        return 0
    last = records[-1]
    if last.get("diverged"):
        checkpoint = Path(out) / ckpt.CHECKPOINT_NAME
        print(
            f"flatmin train: {config.method} {divergence_message(checkpoint, last['epoch'])}",
            file=sys.stderr,
        )
        return 1
    print(
        f"{config.method}: test accuracy {last['test_acc']:.4f} after epoch "
        f"{last['epoch']}/{config.epochs}; run files in {out}"
    )
    return 0


def _run_under_torchrun(
    config: TrainConfig, out: Path, args: argparse.Namespace, log: Any,
    trainer: type[DistributedTrainer],
) -> list[dict[str, Any]]:  # fmt: skip
    """This process's share of a torchrun group; the records on rank 0, none elsewhere."""
    rank, nproc = init_from_env()
    try:
        records = train_in_group(rank, nproc, config.resolved(), str(out), args.resume,
                                 args.stop_after, lock=True,
                                 epoch_callbacks=() if log is None else (log,),
                                 trainer=trainer)  # fmt: skip
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group()
    return records if rank == 0 else []


def _completed_epochs(out: Path) -> int:
    path = out / ckpt.METRICS_NAME
    return len(ckpt.read_metrics(path)) if path.is_file() else 0


def summary_line(record: Mapping[str, Any], epochs: int) -> str:
    """One epoch's record as the line ``flatmin train`` prints."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "val_acc", "sharpness"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"lr {record['lr']:.4g}")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return "  ".join(parts)


def print_summary(record: Mapping[str, Any], epochs: int) -> None:
    """Print an epoch's summary line on stdout (through tqdm, so that progress bars on
    stderr stay intact). A module-level function: rank 0 of ``--nproc`` calls it."""
    from tqdm.auto import tqdm  # optional: the flatmin[train] extra

    tqdm.write(summary_line(record, epochs))
