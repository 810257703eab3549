"""Helpers shared by test packages: one bit-exact resume assertion for every stateful part,
the comparison of two training runs' checkpoints, files damaged as disks and copies damage
them, the shape of a one-line error, a process umask set for a block, and a miniature
CIFAR-10 on disk."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

TIMINGS = ("wall_time", "images_per_s", "images_per_cpu_s")
RUN_KEYS = ("model", "optimizer", "scheduler", "method_state", "epoch")


def assert_trees_equal(mine: Any, theirs: Any, path: str = "state") -> None:
    """Assert two nested state trees are equal: tensors bit for bit (dtype and shape
    too), mappings key by key, sequences item by item, anything else by ``==``."""
    if isinstance(mine, torch.Tensor):
        assert isinstance(theirs, torch.Tensor), f"{path}: a tensor against {theirs!r}"
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, path
        assert torch.equal(mine, theirs), f"{path} differs"
    elif isinstance(mine, Mapping):
        assert isinstance(theirs, Mapping) and mine.keys() == theirs.keys(), path
        for key in mine:
            assert_trees_equal(mine[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(mine, (list, tuple)):
        assert isinstance(theirs, (list, tuple)) and len(mine) == len(theirs), path
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_trees_equal(a, b, f"{path}[{i}]")
    else:
        assert mine == theirs, f"{path}: {mine!r} != {theirs!r}"


def assert_resumes_bit_exactly(
    make: Callable[[int], Mapping[str, Any]],
    train: Callable[[Mapping[str, Any], range], None],
    *,
    epochs: int,
    stop_after: int,
    checkpoint: Path,
) -> Mapping[str, Any]:
    """Train ``epochs`` epochs straight, and ``stop_after`` epochs then a checkpoint on disk
    then the rest in parts built from another seed; assert every part ends bit-identical.

    ``make(seed)`` builds the stateful parts (name → object with ``state_dict`` and
    ``load_state_dict``: model, optimizer, loss terms); ``train(parts, epochs)`` runs the
    given epochs. Returns the straight run's parts for further checks.
    """
    straight = make(0)
    train(straight, range(epochs))
    first = make(0)
    train(first, range(stop_after))
    torch.save({name: part.state_dict() for name, part in first.items()}, checkpoint)
    resumed = make(1)  # another initialization: everything must come from the checkpoint
    state = torch.load(checkpoint)
    for name, part in resumed.items():
        part.load_state_dict(state[name])
    train(resumed, range(stop_after, epochs))
    for name in straight:
        assert_trees_equal(straight[name].state_dict(), resumed[name].state_dict(), name)
    return straight


def without_timings(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records without the fields that depend on the machine's speed."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def assert_runs_equal(
    straight: Mapping[str, Any] | Path, resumed: Mapping[str, Any] | Path,
    keys: Iterable[str] = RUN_KEYS,
) -> None:  # fmt: skip
    """Two training runs' checkpoints (dicts or files), e.g. an uninterrupted run and one
    stopped and resumed, hold the same state bit for bit in ``keys``; their metrics
    records agree except for timings."""
    if not isinstance(straight, Mapping):
        straight = torch.load(straight, weights_only=True)
    if not isinstance(resumed, Mapping):
        resumed = torch.load(resumed, weights_only=True)
    for key in keys:
        assert_trees_equal(straight[key], resumed[key], key)
    if "metrics" in straight:
        assert without_timings(straight["metrics"]) == without_timings(resumed["metrics"])


def flip_a_stored_byte(path: Path) -> None:
    """Change one byte in the middle of the largest tensor stored in the ``torch.save``
    file ``path``, as a bad disk or a bad copy would, leaving the archive readable."""
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_length, extra_length = struct.unpack("<HH", raw[header + 26 : header + 30])
    raw[header + 30 + name_length + extra_length + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Keep the first ``fraction`` of the file's bytes, as a copy cut short would."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])


def assert_one_line_error(stderr: str, *expected: str) -> None:
    """``stderr`` is exactly one line, names each of ``expected`` and shows no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "weights_only" not in stderr, stderr
    for text in expected:
        assert text in lines[0], stderr


@contextmanager
def umask(mask: int) -> Iterator[int]:
    """Set the process umask to ``mask`` in the block; yields the mode ``open()`` then
    gives a new file (``0o666`` less the mask)."""
    previous = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(previous)


def write_cifar10(
    root: Path, per_batch: int = 3, num_test: int = 4, seed: int = 0
) -> tuple[Path, dict[str, dict]]:
    """A miniature ``cifar-10-batches-py`` directory in ``root``, in the original pickle
    format (five training batches of ``per_batch`` images, a test batch, the meta file);
    returns the folder and each batch's dict."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        n = num_test if name == "test_batch" else per_batch
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        batches[name] = batch
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder, batches


def write_fashion_mnist(
    root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's four IDX gz files in ``root`` (the real names and magic numbers
    0x00000803 / 0x00000801) with random pixels and labels; returns each split's
    ``(images, labels)``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        )
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 0x801, n) + labels.tobytes())
        )
        arrays[split] = images, labels
    return arrays
