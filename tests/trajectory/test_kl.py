import math

import pytest
import torch

from flatmin.trajectory.kl import tempered_kl, zero_term
from tests.trajectory.helpers import numpy_tempered_kl


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
