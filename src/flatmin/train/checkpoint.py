"""Run files that survive interruption: checkpoints, the metrics log and the config.

A run directory holds ``checkpoint.pt`` (the whole training state after the last
complete epoch), ``metrics.jsonl`` (one JSON object per completed epoch) and
``config.json`` (the exact configuration). Every file is written to a temporary file in
the same directory and moved into place with :func:`os.replace` (:func:`atomic_write`),
which is atomic on POSIX and Windows: a run killed at any instant (Ctrl-C, out of memory,
power loss after the rename) leaves the previous complete version of each file, never a
torn one. The files get the permissions ``open()`` gives (``0o666`` less the umask).

The checkpoint is a ``torch.save``'d dict with the keys in :data:`CHECKPOINT_KEYS`. It
holds only tensors and plain Python values, so ``torch.load(path)`` with the default
``weights_only=True`` reads it; :func:`load_checkpoint` also checks it:

- ``"model"``: the model's ``state_dict``;
- ``"config"``: the flat run configuration (``"method"``, ``"model"``, ``"dataset"``,
  ``"data_dir"``, ``"seed"``, … and every method hyperparameter);
- ``"optimizer"``, ``"scheduler"``: their ``state_dict`` (a SAM-family optimizer nests
  its base optimizer's state);
- ``"method_state"``: the loss terms' state (SAF's logit store, MESA's teacher);
- ``"rng"``: the global torch, numpy and Python generators;
- ``"epoch"``: how many epochs are complete;
- ``"metrics"``: the per-epoch records so far (the metrics file is rebuilt from them);
- ``"world_size"``: how many processes trained it (a run resumes on as many);
- ``"checksum"``: the SHA-256 of every other entry (:func:`state_checksum`), so a file
  whose bytes changed after it was written is refused instead of resumed.

A run of the FSDP2 trainer (``--fsdp``, :mod:`flatmin.train.fsdp`) keeps ``"model"``,
``"optimizer"``, ``"method_state"`` and ``"rng"`` empty here and adds ``"sharded"``: the
name of the ``torch.distributed.checkpoint`` directory beside it that holds them, sharded,
and the SHA-256 of each of its files (:func:`digests`, checked by :func:`shard_problem`).

:func:`load_run` rebuilds a run's model (weights loaded) and its data from a run
directory or a checkpoint file, for anything that measures a trained model.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatmin.train._files import atomic_write
from flatmin.train.config import TrainConfig, resume_conflicts
from flatmin.train.data import DatasetBundle
from flatmin.train.models import build_model

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
CHECKPOINT_KEYS = (
    "model",
    "config",
    "optimizer",
    "scheduler",
    "method_state",
    "rng",
    "epoch",
    "metrics",
    "world_size",
)


class CheckpointError(ValueError):
    """A file that cannot be used as a flatmin checkpoint (unreadable, foreign, corrupted)."""


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt.

    Each file is atomic on its own; deferring the interrupt keeps the checkpoint and the
    metrics log of one epoch together. Outside the main thread signals cannot be
    handled, and the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def state_checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the entries of ``state`` other than ``"checksum"``: every key,
    every tensor's dtype, shape and bytes, and every plain value, in order."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if torch.is_tensor(obj):
            t = obj.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(obj, Mapping):
            digest.update(f"D{len(obj)}".encode())
            for key, value in obj.items():
                digest.update(f"K{key!r}".encode())
                feed(value)
        elif isinstance(obj, (list, tuple)):
            digest.update(f"L{len(obj)}".encode())
            for value in obj:
                feed(value)
        else:
            digest.update(f"V{obj!r}".encode())

    feed({k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def save_checkpoint(path: Path, checkpoint: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint that has :data:`CHECKPOINT_KEYS`, with its
    checksum added."""
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks keys {missing}")
    state = {k: v for k, v in checkpoint.items() if k != "checksum"}
    state["checksum"] = state_checksum(state)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU (``weights_only=True``) and check its keys and checksum.

    ``FileNotFoundError`` if there is no file; :class:`CheckpointError` (a ``ValueError``
    with a one-line message, and no warning from ``torch.load`` before it) for a
    truncated, corrupted or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # torch warns about what it finds in a foreign file (e.g. "Detected pickle protocol
        # 4") before failing; the one-line error below says all the user needs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds; none is the user's bug
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({type(error).__name__}): the file is "
            "truncated, corrupted or not a flatmin checkpoint"
        ) from None
    expected = (*CHECKPOINT_KEYS, "checksum")
    missing = [k for k in expected if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a flatmin checkpoint (missing {', '.join(missing)}); "
            "flatmin train writes one after every epoch"
        )
    if state_checksum(checkpoint) != checkpoint["checksum"]:
        raise CheckpointError(
            f"{path} is corrupted: its contents do not match the checksum stored with it "
            "(the file changed after it was written); it cannot be used"
        )
    return checkpoint


def resume_state(
    out_dir: Path,
    config: Mapping[str, Any],
    *,
    resume: bool,
    world_size: int = 1,
    sharded: bool = False,
) -> dict[str, Any] | None:
    """The checkpoint a run configured as ``config`` (flat, :meth:`TrainConfig.to_dict`)
    continues from ``out_dir``; ``None`` for a new run.

    ``ValueError`` when a new run would overwrite a checkpoint, or when the checkpoint
    was written with other settings, by another number of processes, or sharded by the
    FSDP2 trainer (``"sharded"`` names its directory) when ``sharded`` is False, or the
    other way round.
    """
    path = Path(out_dir) / CHECKPOINT_NAME
    if not resume:
        if path.exists():
            raise ValueError(
                f"{out_dir} already holds a run ({CHECKPOINT_NAME}); continue it with "
                "--resume or choose another --out"
            )
        return None
    state = load_checkpoint(path)
    reasons = resume_conflicts(state["config"], config)
    if state["world_size"] != world_size:
        reasons.append(
            f"the checkpoint was written by {state['world_size']} process(es) "
            f"(--nproc {state['world_size']}), not {world_size}: the per-process batches "
            "and perturbations would differ"
        )
    if ("sharded" in state) != sharded:
        reasons.append(
            "the checkpoint is sharded (trained with --fsdp): resume it with --fsdp"
            if sharded is False
            else "the checkpoint is not sharded (trained without --fsdp): resume it without --fsdp"
        )
    if reasons:
        raise ValueError(f"cannot resume {out_dir}: " + "; ".join(reasons))
    return state


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_metrics(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Atomically write the whole metrics log, one JSON object per line."""
    text = "".join(json.dumps(dict(r)) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rng_state() -> dict[str, Any]:
    """The global random generators (torch, numpy, Python) as tensors and plain values.

    The data order needs none of them: it is a function of the seed and the epoch
    (:func:`flatmin.train.data.set_loader_epoch`)."""
    # The legacy global generator is saved because user code and libraries draw from it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate(_to_tuples(state["python"]))


def _to_lists(obj: Any) -> Any:
    return [_to_lists(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(v) for v in obj) if isinstance(obj, (tuple, list)) else obj


def digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of a sharded checkpoint directory, by file name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def shard_problem(directory: Path, expected: Mapping[str, str]) -> str | None:
    """Why the sharded checkpoint in ``directory`` cannot be used, or ``None``."""
    if not directory.is_dir():
        return f"{directory} is missing: the checkpoint's shards are gone"
    found = digests(directory)
    if set(found) != set(expected):
        return (
            f"{directory} holds the files {sorted(found)}, the checkpoint names "
            f"{sorted(expected)}: it is not the directory that was written with it"
        )
    changed = sorted(name for name in expected if found[name] != expected[name])
    if changed:
        return (
            f"{directory} is corrupted: {', '.join(changed)} changed after it was "
            "written (its digest differs); it cannot be used"
        )
    return None


@dataclass
class LoadedRun:
    """A trained run rebuilt from its checkpoint: ``model`` holds the saved weights (in
    eval mode) and ``data`` the datasets exactly as training split and noised them."""

    config: TrainConfig
    model: nn.Module
    data: DatasetBundle
    checkpoint: dict[str, Any]


def load_run(path: str | Path, *, data_dir: str | None = None) -> LoadedRun:
    """The model and data of a run directory (or of its checkpoint file ``path``).

    ``data_dir`` overrides where the dataset is read from. Training augmentation is off:
    the data are what the model was trained on, not random crops of it. Errors as
    :func:`load_checkpoint`, plus a :class:`CheckpointError` when the weights do not fit
    the model the checkpoint's configuration names.
    """
    path = Path(path)
    checkpoint_path = path / CHECKPOINT_NAME if path.is_dir() else path
    checkpoint = load_checkpoint(checkpoint_path)
    config = TrainConfig.from_dict(checkpoint["config"])
    if data_dir is not None:
        config = replace(config, data_dir=data_dir)
    data = config.load_data(augment=False)
    model = build_model(config.model, data.num_classes, data.input_shape)
    weights = checkpoint["model"]
    if "sharded" in checkpoint:  # a --fsdp run: the whole weights, from every shard
        weights = _gathered_weights(checkpoint_path.parent, checkpoint["sharded"], model)
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise CheckpointError(
            f"{checkpoint_path}: the saved weights do not fit the model {config.model!r} "
            f"for {config.dataset} that its configuration names"
        ) from None
    return LoadedRun(config, model.eval(), data, checkpoint)


def _gathered_weights(run_dir: Path, sharded: Mapping[str, Any], model: nn.Module) -> dict:
    """The model's whole state dict, read on this one process from a sharded checkpoint
    (its digests checked first)."""
    # Imported here: torch.distributed.checkpoint costs a second, and only --fsdp runs
    # need it.
    from flatmin.distributed.sharded_checkpoint import load_sharded

    directory = run_dir / sharded["directory"]
    problem = shard_problem(directory, sharded["digests"])
    if problem is not None:
        raise CheckpointError(problem)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "… assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load_sharded(state, directory)
    return state["model"]
