"""The compiled loops against the eager torch code they replace: the same rows, the same
term and gradient (to float32 rounding), the eager code's answer wherever the loops defer."""

import math
import os
import subprocess
import sys

import pytest
import torch

from flatmin.trajectory import _topk_compiled
from flatmin.trajectory.kl import bucketed_tempered_kl
from flatmin.trajectory.topk_store import TopKLogitStore

pytestmark = pytest.mark.skipif(not _topk_compiled.ENABLED, reason="numba is not installed")


def _both(monkeypatch, run):
    """``run()`` through the compiled loops, then through the eager code."""
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_topk_compiled, "ENABLED", enabled)
        results.append(run())
    return results


@pytest.mark.parametrize(
    ("classes", "k", "dtype"),
    [(3, 1, torch.float16), (10, 5, torch.float16), (10, 10, torch.float32),
     (300, 16, torch.float16), (1000, 20, torch.float32), (40_000, 3, torch.float16)],
)  # fmt: skip
def test_encode_writes_the_rows_the_eager_code_writes(monkeypatch, classes, k, dtype):
    store = TopKLogitStore(8, classes, 1, top_k=k, dtype=dtype)
    logits = torch.randn(24, classes) * 4
    logits[1, 0], logits[2, -1], logits[3, 1] = float("nan"), float("-inf"), 7e4
    compiled, eager = _both(monkeypatch, lambda: store.unpack(store.encode(logits, 5.0)))
    finite = compiled.rest_lse.isnan().logical_not()
    # NaN and -inf are never stored, 7e4 only in float32 (it overflows float16)
    expected = [True, False, False, dtype == torch.float32] + [True] * 20
    assert finite.tolist() == expected == (~eager.rest_lse.isnan()).tolist()
    assert torch.equal(compiled.values[finite], eager.values[finite])
    assert torch.equal(compiled.classes[finite], eager.classes[finite])
    if k == classes:
        assert torch.all(compiled.rest_lse[finite] == float("-inf"))
    else:
        torch.testing.assert_close(compiled.rest_lse[finite], eager.rest_lse[finite])


def test_encode_leaves_the_padding_zero_and_reads_strided_logits(monkeypatch):
    store = TopKLogitStore(8, 50, 1, top_k=1)  # 4 + 2 + 1 bytes, padded to 8
    logits = (torch.randn(50, 12) * 3).t()  # a transposed view: not contiguous
    (compiled,), (eager,) = _both(monkeypatch, lambda: store.encode(logits, 2.0))
    assert store.row_bytes == 8 and torch.all(compiled[:, 7] == 0)
    assert torch.equal(compiled[:, 4:7], eager[:, 4:7])  # the value and the class


@pytest.mark.parametrize("scale", [1.0, 40.0, 400.0, 1e-3])
@pytest.mark.parametrize(("classes", "k"), [(10, 3), (10, 10), (200, 20)])
def test_the_term_and_its_gradient_are_the_eager_ones(monkeypatch, scale, classes, k):
    """Logits near 0 and far from it (the loops then shift the exponentials by the
    maximum, as the eager code always does)."""
    store = TopKLogitStore(32, classes, 1, top_k=k)
    past, z = torch.randn(32, classes) * scale, torch.randn(32, classes) * scale
    z[:, 0] += 3 * scale  # one class far above the others
    rows = store.encode(past, 5.0)
    valid = torch.rand(32) < 0.8

    def term():
        present = z.clone().requires_grad_()
        value = store.kl(present, rows, 5.0, valid, weight=0.5)
        return value, torch.autograd.grad(value, present)[0]

    (value, grad), (eager_value, eager_grad) = _both(monkeypatch, term)
    # abs_tol: a term near 0 is float32 noise of the size λ·τ²·ε·log C either way
    assert math.isclose(value.item(), eager_value.item(), rel_tol=2e-5, abs_tol=2e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=2e-4, atol=1e-8)  # q − p: cancels
    assert grad[~valid].eq(0).all()


def test_a_counted_row_that_is_not_finite_gets_the_eager_answer(monkeypatch):
    past, z = torch.randn(6, 9), torch.randn(6, 9)
    z[2, 4], z[4, 0] = float("inf"), float("nan")
    top, classes = past.topk(3, dim=1)
    rest = (past / 2).scatter(1, classes, float("-inf")).logsumexp(dim=1)

    def term():
        present = z.clone().requires_grad_()
        value = bucketed_tempered_kl(present, top, classes, rest, 2.0)
        return value, torch.autograd.grad(value, present)[0]

    (value, grad), (eager_value, eager_grad) = _both(monkeypatch, term)
    assert value.isnan() and eager_value.isnan()
    assert torch.equal(grad.isnan(), eager_grad.isnan())
    finite = ~grad.isnan()
    assert torch.equal(grad[finite], eager_grad[finite])


def test_other_dtypes_and_the_switch_take_the_eager_code():
    assert _topk_compiled.applies(torch.zeros(2, 3))
    assert not _topk_compiled.applies(torch.zeros(2, 3, dtype=torch.float64))
    assert not _topk_compiled.applies(torch.zeros(2, 3, dtype=torch.bfloat16))
    script = "from flatmin.trajectory import _topk_compiled as c; print(c.ENABLED)"
    env = {**os.environ, "FLATMIN_NUMBA": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_loops_refuse_a_class_outside_the_logits_before_reading_through_it():
    """A store's rows are trusted by the term; a bad class must still not read or write
    past a row (the loops have no bounds checks), whichever row holds it."""
    z, top, rest = torch.randn(3, 6), torch.randn(3, 2), torch.zeros(3, 1)
    index = torch.tensor([[0, 1], [2, 3], [4, 6]])
    with pytest.raises(ValueError, match=r"stored classes of every counted row in \[0, 6\)"):
        _topk_compiled.bucketed_forward(z, top, index, rest, None, 5.0, 1.0)
    valid = torch.tensor([True, True, False])  # the bad row is not counted: never read
    value, grad = _topk_compiled.bucketed_forward(z, top, index, rest, valid, 5.0, 1.0)
    assert torch.isfinite(value) and grad[2].eq(0).all()
