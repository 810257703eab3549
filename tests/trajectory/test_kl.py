import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatmin.trajectory.kl import bucketed_tempered_kl, tempered_kl, zero_term
from tests.trajectory.helpers import bucketed_gradient, numpy_bucketed_kl, numpy_tempered_kl


@pytest.mark.parametrize("tau", [0.5, 1.0, 5.0])
def test_exactly_zero_when_past_equals_present(tau):
    z = torch.randn(16, 10) * 7
    assert tempered_kl(z, z.clone(), tau).item() == 0.0
    assert tempered_kl(z, z.clone(), tau, valid=torch.rand(16) < 0.5).item() == 0.0


def test_value_matches_independent_numpy_computation():
    z = torch.randn(8, 5, dtype=torch.float64) * 3
    t = torch.randn(8, 5, dtype=torch.float64) * 3
    expected = numpy_tempered_kl(z.numpy(), t.numpy(), 5.0)
    assert math.isclose(tempered_kl(z, t, 5.0).item(), expected, rel_tol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_gradient_is_the_closed_form(tau):
    batch, lam = 6, 0.3
    z = (torch.randn(batch, 7, dtype=torch.float64) * 4).requires_grad_()
    z_past = torch.randn(batch, 7, dtype=torch.float64) * 4
    (lam * tempered_kl(z, z_past, tau)).backward()
    closed_form = lam * tau * (torch.softmax(z / tau, 1) - torch.softmax(z_past / tau, 1)) / batch
    torch.testing.assert_close(z.grad, closed_form.detach(), rtol=1e-10, atol=1e-14)


def test_target_is_a_constant():
    z = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    tempered_kl(z, t, 2.0).backward()
    assert t.grad is None
    assert z.grad is not None


def test_mask_takes_the_mean_over_valid_rows_only():
    z = (torch.randn(6, 4, dtype=torch.float64)).requires_grad_()
    t = torch.randn(6, 4, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, False])
    term = tempered_kl(z, t, 3.0, valid)
    expected = numpy_tempered_kl(z[valid].detach().numpy(), t[valid].numpy(), 3.0)
    assert math.isclose(term.item(), expected, rel_tol=1e-12)
    term.backward()
    assert torch.all(z.grad[~valid] == 0)
    closed_form = 3.0 * (torch.softmax(z / 3, 1) - torch.softmax(t / 3, 1)) / 3
    torch.testing.assert_close(z.grad[valid], closed_form[valid].detach())


def test_no_valid_row_gives_an_exact_zero_attached_to_the_graph():
    z = torch.randn(5, 3, requires_grad=True)
    term = tempered_kl(z, torch.randn(5, 3), 5.0, torch.zeros(5, dtype=torch.bool))
    assert term.item() == 0.0
    term.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_zero_term_is_zero_even_for_non_finite_logits():
    z = torch.tensor([[float("nan"), float("inf")], [1.0, 2.0]], requires_grad=True)
    term = zero_term(z)
    assert term.item() == 0.0 and term.requires_grad
    term.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_half_logits_give_a_float32_term():
    z = torch.randn(4, 3).half()
    assert tempered_kl(z, torch.randn(4, 3), 5.0).dtype == torch.float32
    assert zero_term(z).dtype == torch.float32


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"same shape \(B, C\)"):
        tempered_kl(torch.randn(4, 3), torch.randn(4, 2), 5.0)
    with pytest.raises(ValueError, match="tau > 0"):
        tempered_kl(torch.randn(4, 3), torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match=r"valid mask of shape \(4,\)"):
        tempered_kl(torch.randn(4, 3), torch.randn(4, 3), 1.0, torch.ones(3, dtype=torch.bool))


def test_an_empty_batch_gives_zero_not_nan():
    z = torch.randn(0, 3, requires_grad=True)
    assert tempered_kl(z, torch.randn(0, 3), 5.0).item() == 0.0


# -- the bucketed term (a top-k target) ---------------------------------------------------


def _compress(past: torch.Tensor, k: int, tau: float):
    """The top-k fields of ``past`` as a store keeps them (here in ``past``'s dtype)."""
    top, classes = past.topk(k, dim=1)
    rest = (past / tau).scatter(1, classes, float("-inf")).logsumexp(dim=1)
    return top, classes, rest


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_bucketed_value_and_gradient_match_a_direct_float64_computation(k, tau):
    lam, batch = 0.3, 5
    z = (torch.randn(batch, 7, dtype=torch.float64) * 4).requires_grad_()
    past = torch.randn(batch, 7, dtype=torch.float64) * 4
    term = bucketed_tempered_kl(z, *_compress(past, k, tau), tau, weight=lam)
    rows = numpy_bucketed_kl(z.detach().numpy(), past.numpy(), k, tau)
    assert math.isclose(term.item(), lam * rows.mean(), rel_tol=1e-12)
    term.backward()
    expected = lam * bucketed_gradient(z.detach().numpy(), past.numpy(), k, tau) / batch
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(("classes", "k"), [(7, 1), (7, 3), (50, 20), (50, 50)])
def test_float32_value_and_gradient_match_a_direct_float64_computation(topk_path, classes, k):
    lam, batch, tau = 0.3, 6, 5.0
    z = (torch.randn(batch, classes) * 4).requires_grad_()
    past = torch.randn(batch, classes) * 4
    valid = torch.tensor([True, False, True, True, True, False])
    term = bucketed_tempered_kl(z, *_compress(past, k, tau), tau, valid, weight=lam)
    rows = numpy_bucketed_kl(z.detach().double().numpy(), past.double().numpy(), k, tau)
    assert math.isclose(term.item(), lam * rows[valid.numpy()].mean(), rel_tol=1e-5)
    term.backward()
    expected = bucketed_gradient(z.detach().double().numpy(), past.double().numpy(), k, tau)
    expected = lam * expected * valid.numpy()[:, None] / valid.sum().item()
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-4, atol=1e-8)


def test_k_equal_to_c_is_the_full_term_and_gradient():
    z = (torch.randn(6, 5, dtype=torch.float64) * 3).requires_grad_()
    past = torch.randn(6, 5, dtype=torch.float64) * 3
    valid = torch.tensor([True, True, False, True, False, True])
    full = tempered_kl(z, past, 5.0, valid, weight=0.3)
    (full_grad,) = torch.autograd.grad(full, z)
    top = bucketed_tempered_kl(z, *_compress(past, 5, 5.0), 5.0, valid, weight=0.3)
    (top_grad,) = torch.autograd.grad(top, z)
    assert math.isclose(top.item(), full.item(), rel_tol=1e-13)
    torch.testing.assert_close(top_grad, full_grad, rtol=1e-12, atol=1e-16)


@settings(max_examples=60, deadline=None)
@given(
    classes=st.integers(2, 12),
    data=st.data(),
    tau=st.floats(0.5, 8.0),
    spread=st.floats(0.1, 30.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_merging_classes_never_increases_the_kl(classes, data, tau, spread, seed):
    """KL_k ≤ KL_{k+1} ≤ … ≤ KL_C = KL: a larger top set refines the grouping."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, classes, generator=gen, dtype=torch.float64) * spread
    past = torch.randn(4, classes, generator=gen, dtype=torch.float64) * spread
    k = data.draw(st.integers(1, classes))
    values = [bucketed_tempered_kl(z, *_compress(past, j, tau), tau).item() for j in (k, classes)]
    coarser = bucketed_tempered_kl(z, *_compress(past, max(k - 1, 1), tau), tau).item()
    full = tempered_kl(z, past, tau).item()
    slack = 1e-12 * (1 + full)
    assert 0 <= coarser <= values[0] + slack
    assert values[0] <= full + slack
    assert math.isclose(values[1], full, rel_tol=1e-9, abs_tol=1e-15)


def test_no_mass_outside_the_top_gives_a_zero_bucket_not_nan(topk_path):
    """r underflows to 0 in float32 (the past puts e^-200 outside its top class)."""
    past = torch.zeros(3, 6)
    past[:, 0] = 200.0
    z = torch.randn(3, 6, requires_grad=True)
    top, classes, rest = _compress(past, 1, 1.0)
    assert torch.exp(rest - top[:, 0]).eq(0).all()  # r is 0 in float32
    term = bucketed_tempered_kl(z, top, classes, rest, 1.0)
    term.backward()
    expected = numpy_bucketed_kl(z.detach().double().numpy(), past.double().numpy(), 1, 1.0)
    assert math.isclose(term.item(), expected.mean(), rel_tol=1e-5)
    assert torch.isfinite(z.grad).all()


def test_a_tiny_present_mass_outside_the_top_gives_a_large_finite_term(topk_path):
    """Σ_{j∉top} q_j ≈ 5·e^-200 underflows in float32; its log does not."""
    past = torch.randn(3, 6) * 0.1  # the past is nearly uniform: r ≈ 5/6
    z = torch.zeros(3, 6)
    z[torch.arange(3), past.argmax(dim=1)] = 200.0
    z.requires_grad_()
    term = bucketed_tempered_kl(z, *_compress(past, 1, 1.0), 1.0)
    full = tempered_kl(z, past, 1.0)
    term.backward()
    expected = numpy_bucketed_kl(z.detach().double().numpy(), past.double().numpy(), 1, 1.0)
    assert math.isclose(term.item(), expected.mean(), rel_tol=1e-5)
    assert 100 < term.item() <= full.item() and torch.isfinite(z.grad).all()


def test_float16_top_values_and_float32_rest_give_the_term_of_the_rounded_past(topk_path):
    past = (torch.randn(4, 9) * 6).half().float()  # the values a float16 store returns
    z = (torch.randn(4, 9) * 6).requires_grad_()
    top, classes, rest = _compress(past, 3, 5.0)
    term = bucketed_tempered_kl(z, top.half(), classes.to(torch.uint8), rest, 5.0)
    expected = numpy_bucketed_kl(z.detach().double().numpy(), past.double().numpy(), 3, 5.0)
    assert term.dtype == torch.float32
    assert math.isclose(term.item(), expected.mean(), rel_tol=1e-5)


def test_invalid_rows_get_no_gradient_whatever_their_logits_and_targets_hold(topk_path):
    z = torch.randn(4, 5)
    z[2, 1], z[3, 0] = float("inf"), float("-inf")
    z.requires_grad_()
    past = torch.randn(4, 5)
    top, classes, rest = _compress(past, 2, 5.0)
    top[1], classes[1], rest[1] = 0, 0, 0  # a never-written slot: all zeros
    top[2], rest[2] = float("nan"), float("nan")  # garbage a padded exchange may carry
    valid = torch.tensor([True, False, False, False])
    term = bucketed_tempered_kl(z, top, classes, rest, 5.0, valid)
    full = tempered_kl(z, past, 5.0, valid)
    (grad,) = torch.autograd.grad(term, z)
    (full_grad,) = torch.autograd.grad(full, z)
    assert torch.isfinite(term) and torch.isfinite(full)
    assert grad[1:].eq(0).all()
    assert full_grad[2].isnan().all()  # the full term's +inf row: NaN throughout
    expected = bucketed_gradient(z[:1].detach().double().numpy(), past[:1].double().numpy(), 2, 5.0)
    np.testing.assert_allclose(grad[0].numpy(), expected[0], rtol=1e-5, atol=1e-7)


def test_bucketed_classes_outside_the_logits_are_a_clear_error(topk_path):
    z, top, rest = torch.randn(4, 5), torch.randn(4, 2), torch.zeros(4)
    classes = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 2]])
    with pytest.raises(ValueError, match=r"top_classes in \[0, 5\), got values in \[0, 5\]"):
        bucketed_tempered_kl(z, top, classes, rest, 5.0)
    with pytest.raises(ValueError, match=r"got values in \[-1, 4\]"):
        bucketed_tempered_kl(z, top, classes.clamp(max=4) - (classes == 0).long(), rest, 5.0)


def test_bucketed_bad_input_is_a_clear_error():
    z, top, classes, rest = torch.randn(4, 5), torch.randn(4, 2), torch.zeros(4, 2), torch.zeros(4)
    with pytest.raises(TypeError, match="integer top_classes"):
        bucketed_tempered_kl(z, top, classes, rest, 5.0)
    classes = classes.long()
    with pytest.raises(ValueError, match=r"1 <= k <= C"):
        bucketed_tempered_kl(z, torch.randn(4, 6), torch.zeros(4, 6).long(), rest, 5.0)
    with pytest.raises(ValueError, match=r"rest_lse \(B,\)"):
        bucketed_tempered_kl(z, top, classes, torch.zeros(3), 5.0)
    with pytest.raises(ValueError, match="tau > 0"):
        bucketed_tempered_kl(z, top, classes, rest, 0.0)
    assert bucketed_tempered_kl(z[:0], top[:0], classes[:0], rest[:0], 5.0).item() == 0.0


def test_bucketed_half_logits_give_a_float32_term_and_a_half_gradient():
    z = (torch.randn(4, 6) * 3).half().requires_grad_()
    past = torch.randn(4, 6) * 3
    term = bucketed_tempered_kl(z, *_compress(past, 2, 5.0), 5.0)
    term.backward()
    assert term.dtype == torch.float32 and z.grad.dtype == torch.float16
    expected = bucketed_gradient(z.detach().double().numpy(), past.double().numpy(), 2, 5.0) / 4
    np.testing.assert_allclose(z.grad.double().numpy(), expected, rtol=1e-2, atol=1e-4)
