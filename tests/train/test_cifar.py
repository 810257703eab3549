import pickle

import numpy as np
import pytest

from flatmin.train._cifar import read_cifar
from tests.helpers import write_cifar10


def write_cifar100(root, num_train=6, num_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in (("train", num_train), ("test", num_test)):
        batch = {
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        batches[name] = batch
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}))
    return folder, batches


def test_reads_cifar10_batches_in_order_and_channel_major(tmp_path):
    folder, batches = write_cifar10(tmp_path)
    train_x, train_y, test_x, test_y, source = read_cifar("cifar10", tmp_path)
    assert source == folder
    assert train_x.shape == (15, 3, 32, 32) and train_x.dtype == np.uint8
    expected_labels = [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][b"labels"]]
    np.testing.assert_array_equal(train_y, expected_labels)
    np.testing.assert_array_equal(test_y, batches["test_batch"][b"labels"])
    # Row layout: 1024 red values, then green, then blue, each row-major over 32×32.
    row = batches["data_batch_2"][b"data"][1]
    image = train_x[3 + 1]
    for c, i, j in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert image[c, i, j] == row[c * 1024 + i * 32 + j]
    np.testing.assert_array_equal(test_x[2].reshape(-1), batches["test_batch"][b"data"][2])


def test_accepts_the_batches_directory_itself(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    assert read_cifar("cifar10", folder)[4] == folder


def test_reads_cifar100_fine_labels(tmp_path):
    _, batches = write_cifar100(tmp_path)
    train_x, train_y, test_x, test_y, _ = read_cifar("cifar100", tmp_path)
    assert train_x.shape == (6, 3, 32, 32) and test_x.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(train_y, batches["train"][b"fine_labels"])
    np.testing.assert_array_equal(test_y, batches["test"][b"fine_labels"])


def test_missing_data_dir_says_what_is_expected():
    with pytest.raises(FileNotFoundError, match="data-dir") as err:
        read_cifar("cifar10", None)
    for name in ("cifar-10-batches-py", "data_batch_1", "data_batch_5", "test_batch"):
        assert name in str(err.value)


def test_missing_files_are_named(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        read_cifar("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing train, test, meta"):
        read_cifar("cifar100", tmp_path / "empty")


def test_corrupt_pickle_is_refused(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        read_cifar("cifar10", tmp_path)


def test_wrong_label_range_is_refused(tmp_path):
    folder, batches = write_cifar10(tmp_path)
    batch = batches["data_batch_1"]
    batch[b"labels"][0] = 10
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        read_cifar("cifar10", tmp_path)
