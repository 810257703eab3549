"""The numba loops' scalar parts against torch and float64: exp, float16 conversions,
the top-k selection."""

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")

from flatmin.trajectory import _topk_loops  # noqa: E402 (needs numba)


@numba.njit
def _each(function, values, out):
    for i in range(values.shape[0]):
        out[i] = function(values[i])


def _apply(function, values: np.ndarray, dtype) -> np.ndarray:
    out = np.empty(values.shape, dtype=dtype)
    _each(function, values, out)
    return out


def test_exp32_is_within_two_ulp_of_exp_and_exactly_zero_below_minus_86():
    x = np.linspace(-86.0, 88.0, 3_000_001, dtype=np.float32)
    got = _apply(_topk_loops.exp32, x, np.float32).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert (np.abs(got - exact) <= 2 * ulp).all()
    below = np.array([-86.01, -90.0, -104.0, -1e30, -np.inf], dtype=np.float32)
    assert (_apply(_topk_loops.exp32, below, np.float32) == 0).all()


def test_half_bits_round_like_torch_for_every_kind_of_float32():
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([
        patterns.view(np.float32),
        np.float32([0.0, -0.0, 65504.0, 65519.996, 65520.0, -65520.0, 2**-24, 2**-25,
                    1.5 * 2**-25, 2**-14, 2**-14 - 2**-25, 1 + 2**-11, 1 + 3 * 2**-11,
                    np.inf, -np.inf, 1e-45]),
        (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32),
    ])  # fmt: skip
    got = _apply(_topk_loops.half_bits, x, np.int16)
    expected = torch.from_numpy(x).half().view(torch.int16).numpy()
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], expected[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


def test_half_value_reads_every_float16_like_torch():
    bits = np.arange(-(2**15), 2**15, dtype=np.int32).astype(np.int16)
    got = _apply(_topk_loops.half_value, bits, np.float32)
    expected = torch.from_numpy(bits).view(torch.float16).float().numpy()
    assert np.array_equal(got, expected, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(expected))


@numba.njit
def _top_k_rows(z, k):
    top = np.empty((z.shape[0], k), dtype=np.float32)
    where = np.empty((z.shape[0], k), dtype=np.int64)
    candidates = np.empty(z.shape[1], dtype=np.int64)
    for b in range(z.shape[0]):
        _topk_loops._top_k(z[b], k, top[b], where[b], candidates)
    return top, where


@pytest.mark.parametrize(("classes", "k"), [(10, 1), (10, 10), (40, 16), (100, 20), (1000, 33)])
def test_top_k_is_torch_topk_and_keeps_the_lower_class_first_among_equal_values(classes, k):
    z = torch.randn(64, classes)
    top, where = _top_k_rows(z.numpy(), k)
    expected = z.topk(k, dim=1)
    assert np.array_equal(top, expected.values.numpy())
    assert np.array_equal(where, expected.indices.numpy())
    # Few distinct values: many ties, within and across the blocks of the threshold.
    tied = torch.randint(0, 4, (64, classes)).float()
    top, where = _top_k_rows(tied.numpy(), k)
    order = torch.from_numpy(tied.numpy()).sort(dim=1, descending=True, stable=True)
    assert np.array_equal(top, order.values[:, :k].numpy())
    assert np.array_equal(where, order.indices[:, :k].numpy())
