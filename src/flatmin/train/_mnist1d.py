"""MNIST-1D generated offline with the ``mnist1d`` package and cached as ``.npz``.

S. Greydanus and D. Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024. The
standard dataset is ``make_dataset(get_dataset_args())``: 5,000 length-40 signals split
4,000 / 1,000, generated from the fixed seed 42. The package's ``get_dataset`` downloads;
it is never called here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from pathlib import Path

import numpy as np

from flatmin.train._files import atomic_write

_KEYS = ("x", "y", "x_test", "y_test")


def default_cache_dir() -> Path:
    """``$FLATMIN_CACHE`` when set, else ``~/.cache/flatmin``."""
    env = os.environ.get("FLATMIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flatmin"


def _standard_args():
    from mnist1d.data import get_dataset_args

    return get_dataset_args()


def cache_path(cache_dir: Path) -> Path:
    """The cache file: its name carries a digest of the generation arguments."""
    args = {k: v for k, v in vars(_standard_args()).items() if k != "url"}
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"mnist1d-{digest}.npz"


def generate() -> dict[str, np.ndarray]:
    """Generate the standard split; the global ``random``/``numpy`` RNG states are restored.

    (``make_dataset`` reseeds the global generators with its own seed; a caller's RNG
    streams must not depend on whether the cache was warm.)
    """
    from mnist1d.data import make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(_standard_args())
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in _KEYS}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # truncated, corrupted or not ours: generate it again
    if arrays["x"].shape != (4000, 40) or arrays["x_test"].shape != (1000, 40):
        return None
    return arrays


def load_mnist1d(cache_dir: Path) -> tuple[dict[str, np.ndarray], Path]:
    """The standard MNIST-1D arrays and the cache file they came from (written if absent).

    The file is written atomically (temporary file, then rename), so concurrent runs never
    see a half-written cache, with the permissions ``open()`` gives (``0o666`` less the
    umask); an unreadable cache is regenerated.
    """
    path = cache_path(cache_dir)
    arrays = _read_cache(path) if path.is_file() else None
    if arrays is None:
        arrays = generate()
        atomic_write(path, lambda f: np.savez(f, **arrays))
    return arrays, path
