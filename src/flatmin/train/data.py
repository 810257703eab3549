"""Datasets for the reference trainer, held in memory as tensors.

``load_dataset(name, ...)`` returns a :class:`DatasetBundle` of map-style datasets that
yield ``(x, y)`` with ``x`` a float32 tensor of ``input_shape`` and ``y`` an int64 scalar
tensor. Every dataset is read once into a tensor (uint8 for images), and an item is
standardized (and, for CIFAR training, augmented) when it is fetched; ``__getitems__``
does the same for a whole batch in one tensor operation, which the ``DataLoader`` uses
automatically. With the data already in memory, worker processes would only add pickling
and compete for the cores the model needs, so :func:`make_loader` defaults to
``num_workers=0``.

Choices that decide what an experiment means:

* **Label noise** is *symmetric, excluding the true class*: exactly ``round(p · N)``
  training labels, chosen uniformly without replacement, are each replaced by a class
  drawn uniformly from the ``K − 1`` other classes. The realised ``flipped_fraction``
  is recorded in ``metadata`` (it equals ``p`` up to rounding). Test and validation
  labels are never noised.
* The **validation split** is held out from the training set *before* noise is applied,
  so it measures accuracy on clean labels, like the test set.
* Order of the seeded steps: ``subset`` → validation split → label noise, each from its
  own ``numpy.random.Generator`` derived from ``seed``; the global RNGs are not used.
  The dataset itself (e.g. the digits train/test split) does not depend on ``seed``.
* **Augmentation** (random 32×32 crop of the 4-pixel zero-padded image, then a
  horizontal flip with probability ½, as in He et al., 2016) applies to CIFAR training
  sets only and draws from the global torch RNG, which ``DataLoader`` reseeds per worker.
* Standardization uses the per-channel mean and standard deviation of the training file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flatmin.optim._checks import check_int, check_real
from flatmin.train._cifar import CIFAR_LAYOUTS, read_cifar
from flatmin.train._idx import read_idx
from flatmin.train._mnist1d import default_cache_dir, load_mnist1d

DATASETS = ("mnist1d", "fashion-mnist", "digits", "cifar10", "cifar100")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# Independent random streams derived from the user's seed: (seed, stream id).
_SUBSET_STREAM, _VAL_STREAM, _NOISE_STREAM = 1, 2, 3


def random_crop_flip(images: Tensor, pad: int = 4) -> Tensor:
    """Random ``H×W`` crops of the zero-padded batch ``images`` (B, C, H, W), then random
    horizontal flips with probability ½ — the standard CIFAR augmentation."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1))
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1))
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    # Advanced indices separated by a slice put their (B, H, W) dims first: (B, H, W, C).
    crops = padded[torch.arange(b).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), crops.flip(-1), crops).contiguous()


class InMemoryDataset(Dataset):
    """``(x, y)`` pairs from tensors in memory: ``x = (augment(inputs[i]) − mean) / std``.

    ``inputs`` has shape ``(N, C, ...)`` (uint8 images are scaled to [0, 1] first),
    ``targets`` int64 ``(N,)``; ``mean``/``std`` are per channel (``None``: leave as is).
    ``clean_targets`` keeps the labels before any noise was applied.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
        clean_targets: Tensor | None = None,
    ) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
        self.inputs = inputs
        self.targets = targets.to(torch.int64)
        self.clean_targets = self.targets if clean_targets is None else clean_targets
        self.mean, self.std, self.augment = mean, std, augment
        view = (-1,) + (1,) * (inputs.dim() - 2)
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(view)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(view)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def _prepare(self, raw: Tensor) -> Tensor:
        if self.augment:
            raw = random_crop_flip(raw)
        x = raw.to(torch.float32, copy=True)  # never a view of the stored data
        if raw.dtype == torch.uint8:
            x /= 255
        if self._mean is not None:
            x.sub_(self._mean).div_(self._std)
        return x

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._prepare(self.inputs[index].unsqueeze(0))[0], self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self._prepare(self.inputs[index])
        return list(zip(x.unbind(0), self.targets[index].unbind(0), strict=True))

    def select(self, indices: Tensor | np.ndarray, **overrides: Any) -> InMemoryDataset:
        """A new dataset of the rows ``indices`` (same standardization unless overridden)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        kwargs: dict[str, Any] = dict(
            mean=self.mean,
            std=self.std,
            augment=self.augment,
            clean_targets=self.clean_targets[index],
        )
        kwargs.update(overrides)
        return InMemoryDataset(self.inputs[index], self.targets[index], **kwargs)


@dataclass
class DatasetBundle:
    """What :func:`load_dataset` returns; ``val`` is ``None`` when no split was asked for."""

    name: str
    train: InMemoryDataset
    val: InMemoryDataset | None
    test: InMemoryDataset
    num_classes: int
    input_shape: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


def symmetric_label_noise(
    targets: Tensor, num_classes: int, fraction: float, rng: np.random.Generator
) -> Tensor:
    """Replace exactly ``round(fraction · N)`` labels, chosen uniformly without replacement,
    by ``(y + s) mod K`` with ``s`` uniform on ``{1, …, K−1}`` — a uniformly random class
    other than the true one. Returns a new tensor; ``targets`` is not modified."""
    n = targets.shape[0]
    flipped = rng.choice(n, size=round(fraction * n), replace=False)
    shift = rng.integers(1, num_classes, size=flipped.size)
    noisy = targets.clone()
    index = torch.from_numpy(flipped)
    noisy[index] = (targets[index] + torch.from_numpy(shift)) % num_classes
    return noisy


@dataclass(frozen=True)
class _Raw:
    """A dataset as read from disk: ``(N, C, ...)`` inputs and int labels per split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    num_classes: int
    standardize: bool = True  # False when the data come standardized already


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``(N, C, ...)`` images, uint8 scaled to [0, 1].

    uint8 images go through a 256-bin histogram per channel: exact and without a float
    copy of the whole training set.
    """
    means, stds = [], []
    for c in range(images.shape[1]):
        channel = np.ascontiguousarray(images[:, c])
        if images.dtype == np.uint8:
            counts = torch.from_numpy(channel).flatten().bincount(minlength=256).double().numpy()
            values = np.arange(256) / 255
            mean = counts @ values / counts.sum()
            var = counts @ (values - mean) ** 2 / counts.sum()
        else:
            mean, var = channel.mean(dtype=np.float64), channel.var(dtype=np.float64)
        means.append(float(mean))
        stds.append(float(np.sqrt(var)))
    return means, stds


def _fashion_mnist(data_dir: str | Path | None) -> _Raw:
    root = Path(data_dir).expanduser() if data_dir is not None else FASHION_MNIST_DIR
    if (root / "fashion-mnist").is_dir():
        root = root / "fashion-mnist"
    paths = []
    for name in FASHION_MNIST_FILES:
        gz, plain = root / name, root / name.removesuffix(".gz")
        paths.append(gz if gz.is_file() or not plain.is_file() else plain)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}: missing {', '.join(missing)} (expected "
            f"{', '.join(FASHION_MNIST_FILES)}). Install it with "
            f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}) "
            "or pass --data-dir (data_dir=) pointing at a directory with these files."
        )
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{root}: {split} images must be uint8 (N, 28, 28), got {images.shape}"
            )
        if labels.shape != (images.shape[0],) or labels.max(initial=0) >= 10:
            raise ValueError(f"{root}: {split} labels must be {images.shape[0]} values in [0, 10)")
    return _Raw(train_x[:, None], train_y, test_x[:, None], test_y, str(root), 10)


def _digits() -> _Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        x, digits.target, test_size=360, stratify=digits.target, random_state=0
    )
    return _Raw(train_x, train_y, test_x, test_y, "sklearn.datasets.load_digits", 10)


def _read(name: str, data_dir: str | Path | None) -> _Raw:
    if name == "mnist1d":
        cache_dir = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
        arrays, path = load_mnist1d(cache_dir)
        x, x_test = arrays["x"][:, None], arrays["x_test"][:, None]  # (N, 1, 40)
        # The generator already standardized the whole dataset to mean 0, std 1.
        return _Raw(x, arrays["y"], x_test, arrays["y_test"], str(path), 10, standardize=False)
    if name == "fashion-mnist":
        return _fashion_mnist(data_dir)
    if name == "digits":
        return _digits()
    train_x, train_y, test_x, test_y, folder = read_cifar(name, data_dir)
    return _Raw(train_x, train_y, test_x, test_y, str(folder), CIFAR_LAYOUTS[name].num_classes)


def _check_args(seed: int, label_noise: float, val_fraction: float, subset: int | None) -> None:
    check_int("seed", seed, minimum=0)
    for name, value in (("label_noise", label_noise), ("val_fraction", val_fraction)):
        check_real(name, value, minimum=0.0, maximum=1.0, exclusive_maximum=True,
                   hint="a fraction")  # fmt: skip
    if subset is not None:
        check_int("subset", subset, minimum=1)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    label_noise: float = 0.0,
    val_fraction: float = 0.0,
    augment: bool = True,
    subset: int | None = None,
) -> DatasetBundle:
    """Load ``name`` (one of :data:`DATASETS`) as in-memory train / val / test datasets.

    ``data_dir``: the cache directory for ``mnist1d``; the directory of the IDX files for
    ``fashion-mnist`` (default: the Debian package's ``/usr/share/datasets/fashion-mnist``);
    the python-format directory (or its parent) for ``cifar10``/``cifar100`` (required).
    ``subset`` keeps a seeded random ``subset`` of the training examples and at most as
    many test examples (for quick runs). See the module docstring for noise and splits.
    """
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    _check_args(seed, label_noise, val_fraction, subset)
    raw = _read(key, data_dir)
    mean, std = _channel_stats(raw.train_x) if raw.standardize else (None, None)
    use_augment = augment and key in CIFAR_LAYOUTS
    train = InMemoryDataset(
        torch.from_numpy(np.ascontiguousarray(raw.train_x)),
        torch.from_numpy(np.asarray(raw.train_y, dtype=np.int64)),
        mean=mean,
        std=std,
        augment=use_augment,
    )
    test = InMemoryDataset(
        torch.from_numpy(np.ascontiguousarray(raw.test_x)),
        torch.from_numpy(np.asarray(raw.test_y, dtype=np.int64)),
        mean=mean,
        std=std,
    )
    num_classes = raw.num_classes

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([seed, stream])

    if subset is not None:
        take = rng(_SUBSET_STREAM)
        if subset < len(train):
            train = train.select(np.sort(take.choice(len(train), subset, replace=False)))
        if subset < len(test):
            test = test.select(np.sort(take.choice(len(test), subset, replace=False)))

    val = None
    if val_fraction > 0:
        num_val = round(val_fraction * len(train))
        if not 1 <= num_val < len(train):
            raise ValueError(
                f"val_fraction={val_fraction} of {len(train)} training examples leaves "
                f"{num_val} for validation and {len(train) - num_val} for training; "
                "both must be ≥ 1"
            )
        order = rng(_VAL_STREAM).permutation(len(train))
        val = train.select(np.sort(order[:num_val]), augment=False)
        train = train.select(np.sort(order[num_val:]))

    num_flipped = 0
    if label_noise > 0:
        noisy = symmetric_label_noise(train.targets, num_classes, label_noise, rng(_NOISE_STREAM))
        num_flipped = int((noisy != train.targets).sum())
        train = InMemoryDataset(
            train.inputs, noisy, mean=mean, std=std, augment=use_augment,
            clean_targets=train.targets,
        )  # fmt: skip

    metadata = {
        "source": raw.source,
        "seed": seed,
        "num_train": len(train),
        "num_val": 0 if val is None else len(val),
        "num_test": len(test),
        "label_noise": label_noise,
        "label_noise_kind": "symmetric, excluding the true class",
        "num_flipped": num_flipped,
        "flipped_fraction": num_flipped / len(train),
        "val_fraction": val_fraction,
        "subset": subset,
        "augment": use_augment,
        "mean": mean,
        "std": std,
    }
    return DatasetBundle(
        name=key,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(train.inputs.shape[1:]),
        metadata=metadata,
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` whose shuffling and worker seeds come from its own
    ``torch.Generator`` (seeded with ``seed``), not from the global RNG.

    Call :func:`set_loader_epoch` before each epoch to make the epoch's order and its
    workers' seeds a function of ``(seed, epoch)`` alone, which is what lets a resumed
    run draw exactly what the uninterrupted run drew. Workers are started anew each
    epoch (not persistent: a persistent worker would keep the seed of the epoch it was
    started in). ``num_workers=0`` is the fastest choice for the in-memory datasets here.
    """
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit seed derived from ``(seed, epoch)`` (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Reseed ``loader`` for ``epoch``: its generator (which draws the shuffled order and
    the workers' base seed) from :func:`epoch_seed`, and a sampler with ``set_epoch``
    (``DistributedSampler``) with the epoch."""
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch))
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
