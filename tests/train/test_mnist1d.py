# The legacy global numpy RNG is the subject of one test here.
# ruff: noqa: NPY002
import random

import numpy as np
from mnist1d.data import get_dataset_args, make_dataset

from flatmin.train._mnist1d import cache_path, default_cache_dir, load_mnist1d
from tests.helpers import umask


def test_generates_the_standard_split_and_caches_it(tmp_path):
    arrays, path = load_mnist1d(tmp_path)
    assert path.is_file() and path.parent == tmp_path
    reference = make_dataset(get_dataset_args())  # the package's own generator, seed 42
    for key in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(arrays[key], reference[key].astype(arrays[key].dtype))
    assert arrays["x"].shape == (4000, 40) and arrays["x_test"].shape == (1000, 40)
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["x"], arrays["x"])


def test_second_load_reads_the_cache(tmp_path):
    arrays, path = load_mnist1d(tmp_path)
    # Alter the cached labels: a load that regenerated would not see the change.
    altered = dict(arrays, y=(arrays["y"] + 1) % 10)
    np.savez(path, **altered)
    again, _ = load_mnist1d(tmp_path)
    np.testing.assert_array_equal(again["y"], altered["y"])
    np.testing.assert_array_equal(again["x"], arrays["x"])


def test_generation_is_deterministic(tmp_path):
    a, _ = load_mnist1d(tmp_path / "a")
    b, _ = load_mnist1d(tmp_path / "b")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_unreadable_cache_is_regenerated(tmp_path):
    good, path = load_mnist1d(tmp_path)
    path.write_bytes(b"garbage")
    again, _ = load_mnist1d(tmp_path)
    np.testing.assert_array_equal(again["x"], good["x"])
    with np.load(path) as npz:  # and the cache is repaired
        np.testing.assert_array_equal(npz["x"], good["x"])


def test_generation_leaves_global_rngs_alone(tmp_path):
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(tmp_path)  # cold: runs make_dataset, which reseeds the globals
    assert np.random.rand() == expected_np
    assert random.random() == expected_py


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATMIN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FLATMIN_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "flatmin")
    assert cache_path(tmp_path).name.startswith("mnist1d-")


def test_a_truncated_cache_is_regenerated(tmp_path):
    good, path = load_mnist1d(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # a copy or a write cut short
    again, _ = load_mnist1d(tmp_path)
    for key in good:
        np.testing.assert_array_equal(again[key], good[key])
    assert path.read_bytes() == raw  # and the cache is whole again


def test_the_cache_gets_the_mode_open_gives(tmp_path):
    with umask(0o022) as mode:
        _, path = load_mnist1d(tmp_path)
    assert path.stat().st_mode & 0o777 == mode == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
