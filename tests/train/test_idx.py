import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from flatmin.train._idx import read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, type_code: int, big_endian_dtype: str) -> bytes:
    """An IDX file written from the format description, independently of the reader."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(big_endian_dtype).tobytes()


@pytest.mark.parametrize(
    ("dtype", "type_code", "be"),
    [(np.uint8, 0x08, ">u1"), (np.int32, 0x0C, ">i4"), (np.float32, 0x0D, ">f4")],
)
def test_reads_gzipped_idx_of_each_type(tmp_path, dtype, type_code, be):
    array = (np.arange(2 * 3 * 4) * 7 % 251).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "a-idx3.gz"
    path.write_bytes(gzip.compress(idx_bytes(array, type_code, be)))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_reads_uncompressed_idx(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(labels, 0x08, ">u1"))
    np.testing.assert_array_equal(read_idx(path), labels)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00", "only 1 bytes"),
        (b"\x08\x03\x08\x01" + struct.pack(">I", 2) + b"ab", "magic number"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "unknown IDX element type 0x07"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"ab", "payload has 2 bytes"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"ab", "payload has 2 bytes"),
    ],
)
def test_corrupt_file_is_refused_with_its_name(tmp_path, raw, message):
    path = tmp_path / "bad-idx.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_non_gzip_file_with_gz_name_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(ValueError, match="corrupt"):
        read_idx(path)


def test_truncated_gzip_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8), 8, ">u1"))[:-20])
    with pytest.raises(ValueError, match="corrupt"):
        read_idx(path)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_labels():
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    # Fashion-MNIST's test set is balanced: 1,000 of each of the 10 classes.
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))
