"""Run files that survive interruption: checkpoints, the metrics log and the config.

A run directory holds ``checkpoint.pt`` (the whole training state after the last
complete epoch), ``metrics.jsonl`` (one JSON object per completed epoch) and
``config.json`` (the exact configuration). Every file is written to a temporary file in
the same directory and moved into place with :func:`os.replace`, which is atomic on
POSIX and Windows: a run killed at any instant (Ctrl-C, out of memory, power loss after
the rename) leaves the previous complete version of each file, never a torn one.

The checkpoint is a ``torch.save``'d dict with the keys in :data:`CHECKPOINT_KEYS`. It
holds only tensors and plain Python values, so ``torch.load(path)`` with the default
``weights_only=True`` reads it:

- ``"model"``: the model's ``state_dict``;
- ``"config"``: the flat run configuration (``"method"``, ``"model"``, ``"dataset"``,
  ``"data_dir"``, ``"seed"``, … and every method hyperparameter);
- ``"optimizer"``, ``"scheduler"``: their ``state_dict`` (a SAM-family optimizer nests
  its base optimizer's state);
- ``"method_state"``: the loss terms' state (SAF's logit store, MESA's teacher);
- ``"rng"``: the torch, numpy and Python generators and the data loader's generator;
- ``"epoch"``: how many epochs are complete;
- ``"metrics"``: the per-epoch records so far (the metrics file is rebuilt from them).
"""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

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
)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def save_checkpoint(path: Path, checkpoint: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint dict that has exactly :data:`CHECKPOINT_KEYS`."""
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks keys {missing}")
    atomic_write(path, lambda f: torch.save(dict(checkpoint), f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU (``weights_only=True``) and check its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if not isinstance(checkpoint, dict) or missing:
        raise ValueError(f"{path} is not a flatmin checkpoint (missing keys {missing})")
    return checkpoint


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


def rng_state(loader_generator: torch.Generator | None) -> dict[str, Any]:
    """Every random generator the training loop draws from, as tensors and plain values."""
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
        "loader": None if loader_generator is None else loader_generator.get_state(),
    }


def set_rng_state(state: Mapping[str, Any], loader_generator: torch.Generator | None) -> None:
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
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


def _to_lists(obj: Any) -> Any:
    return [_to_lists(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(v) for v in obj) if isinstance(obj, (tuple, list)) else obj
