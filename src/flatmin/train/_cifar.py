"""Reader for the python-format CIFAR-10 / CIFAR-100 directories.

The layout is the one distributed by A. Krizhevsky ("Learning Multiple Layers of Features
from Tiny Images", 2009): pickled dicts whose ``b"data"`` is a ``(N, 3072)`` uint8 array
(1024 red, then green, then blue values of a 32×32 image, row-major) and whose labels are
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

Unpickling runs code from the file: load only directories you trust.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    num_classes: int

    @property
    def expected_files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        num_classes=100,
    ),
}


def find_cifar_dir(name: str, data_dir: str | Path | None) -> Path:
    """The directory holding ``name``'s files: ``data_dir`` itself or ``data_dir/<folder>``."""
    layout = CIFAR_LAYOUTS[name]
    how = (
        f"{name} cannot be downloaded here: pass --data-dir (data_dir=) pointing at the "
        f"python-format '{layout.folder}' directory (or its parent), which must contain "
        f"{', '.join(layout.expected_files)}"
    )
    if data_dir is None:
        raise FileNotFoundError(how)
    root = Path(data_dir).expanduser()
    folder = root / layout.folder if (root / layout.folder).is_dir() else root
    missing = [f for f in layout.expected_files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}. {how}")
    return folder


def _load_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected a dict with keys b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(
    name: str, data_dir: str | Path | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]:
    """``(train_images, train_labels, test_images, test_labels, directory)``.

    Images are uint8 of shape ``(N, 3, 32, 32)``, labels int64.
    """
    layout = CIFAR_LAYOUTS[name]
    folder = find_cifar_dir(name, data_dir)
    train = [
        _load_batch(folder / f, layout.label_key, layout.num_classes) for f in layout.train_files
    ]
    test_x, test_y = _load_batch(folder / layout.test_file, layout.label_key, layout.num_classes)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y, folder
