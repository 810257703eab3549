"""Hessian eigenvalues and trace against the exact Hessian from ``torch.func.hessian``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatmin.measure import hessian_eigenvalues, hessian_trace
from flatmin.measure._state import measuring
from flatmin.measure.batches import collect_batches
from flatmin.measure.hessian import HessianOperator
from tests.measure.helpers import (
    Quadratic,
    exact_hessian,
    make_data,
    make_mlp,
    mean_output,
    spd_matrix,
)


@pytest.fixture(params=[False, True], ids=["plain", "batchnorm"])
def mlp(request):
    return make_mlp(batch_norm=request.param)


def test_hessian_vector_product_is_exact(mlp):
    x, y = make_data()
    h = exact_hessian(mlp, F.cross_entropy, x, y)
    v = torch.randn(h.shape[0], dtype=torch.float64)
    with measuring(mlp):
        op = HessianOperator(mlp, F.cross_entropy, collect_batches((x, y)), list(mlp.parameters()))
        torch.testing.assert_close(op(v), h @ v, rtol=1e-10, atol=1e-12)


def test_lanczos_top_eigenvalues_match_the_exact_hessian(mlp):
    x, y = make_data()
    exact = torch.linalg.eigvalsh(exact_hessian(mlp, F.cross_entropy, x, y)).flip(0)
    result = hessian_eigenvalues(mlp, F.cross_entropy, (x, y), k=3, tol=1e-6)
    assert result.converged
    torch.testing.assert_close(
        torch.tensor(result.values, dtype=torch.float64), exact[:3], rtol=1e-4, atol=0
    )
    assert result.iterations < exact.numel()  # stopped on convergence, not exhaustion
    assert all(r <= 1e-6 * result.values[0] for r in result.residuals)
    assert (result.num_samples, result.seed, result.method) == (32, 0, "lanczos")


def test_lanczos_smallest_eigenvalues(mlp):
    x, y = make_data()
    exact = torch.linalg.eigvalsh(exact_hessian(mlp, F.cross_entropy, x, y))
    result = hessian_eigenvalues(
        mlp, F.cross_entropy, (x, y), k=2, which="smallest", tol=1e-8, max_iter=200
    )
    assert result.converged
    # the residual bounds the absolute error of each Ritz value
    for value, residual, true in zip(result.values, result.residuals, exact[:2], strict=True):
        assert abs(value - float(true)) <= residual + 1e-12


def test_too_few_iterations_report_not_converged():
    model = make_mlp(batch_norm=True)
    result = hessian_eigenvalues(model, F.cross_entropy, make_data(), k=1, max_iter=2, tol=1e-8)
    assert not result.converged
    assert result.iterations == 2  # residual checks are not counted
    assert result.residuals[0] > 1e-8 * abs(result.values[0])


def test_batches_are_weighted_by_size_and_max_batches_is_honoured():
    model = make_mlp(batch_norm=True)
    x, y = make_data()
    uneven = [(x[:10], y[:10]), (x[10:], y[10:])]
    full = torch.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, x, y))[-1]
    first = torch.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, x[:10], y[:10]))[-1]
    both = hessian_eigenvalues(model, F.cross_entropy, uneven, tol=1e-8)
    one = hessian_eigenvalues(model, F.cross_entropy, uneven, tol=1e-8, max_batches=1)
    assert both.values[0] == pytest.approx(float(full), rel=1e-6)
    assert one.values[0] == pytest.approx(float(first), rel=1e-6)
    assert (both.num_samples, one.num_samples) == (32, 10)


def test_power_iteration_on_a_quadratic_with_known_spectrum():
    spectrum = [5.0, 2.0, 1.0, 0.5, 0.25, 0.1]
    model = Quadratic(spd_matrix(spectrum), torch.ones(6, dtype=torch.float64))
    data = (torch.zeros(1, 6, dtype=torch.float64), torch.zeros(1))
    result = hessian_eigenvalues(model, mean_output, data, k=2, method="power", tol=1e-10)
    assert result.converged
    assert result.values == pytest.approx(spectrum[:2], rel=1e-9)
    assert result.which == "magnitude"


def test_seed_controls_the_start_vector_and_spares_the_global_rng():
    model = make_mlp(batch_norm=False)
    data = make_data()
    state = torch.get_rng_state()
    a = hessian_eigenvalues(model, F.cross_entropy, data, max_iter=3, seed=1)
    b = hessian_eigenvalues(model, F.cross_entropy, data, max_iter=3, seed=1)
    c = hessian_eigenvalues(model, F.cross_entropy, data, max_iter=3, seed=2)
    hessian_trace(model, F.cross_entropy, data, num_queries=6, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.values == b.values
    assert a.values != c.values


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_within_three_standard_errors(mlp, method):
    x, y = make_data()
    exact = float(torch.trace(exact_hessian(mlp, F.cross_entropy, x, y)))
    result = hessian_trace(mlp, F.cross_entropy, (x, y), method=method, num_queries=30)
    assert result.stderr > 0
    assert abs(result.value - exact) <= 3 * result.stderr
    assert (result.num_queries, result.num_samples) == (30, 32)


def test_hutchinson_is_exact_on_a_diagonal_hessian():
    # zᵀ D z = tr D for every Rademacher z, so every sample is the trace
    model = Quadratic(torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)), torch.ones(3))
    data = (torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1))
    result = hessian_trace(model, mean_output, data, method="hutchinson", num_queries=4)
    assert result.value == pytest.approx(4.5, rel=1e-14)
    assert result.stderr == pytest.approx(0.0, abs=1e-14)


def test_hutch_plus_plus_is_exact_when_the_sketch_spans_the_space():
    a = spd_matrix([4.0, 3.0, 2.0, 1.0])
    model = Quadratic(a, torch.ones(4, dtype=torch.float64))
    data = (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1))
    result = hessian_trace(model, mean_output, data, num_queries=14)
    assert result.value == pytest.approx(10.0, rel=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, d: hessian_eigenvalues(m, F.cross_entropy, d, k=0), "k must"),
        (lambda m, d: hessian_eigenvalues(m, F.cross_entropy, d, k=1000), "exceeds"),
        (lambda m, d: hessian_eigenvalues(m, F.cross_entropy, d, method="qr"), "method"),
        (lambda m, d: hessian_eigenvalues(m, F.cross_entropy, d, tol=0.0), "tol"),
        (
            lambda m, d: hessian_eigenvalues(
                m, F.cross_entropy, d, method="power", which="largest"
            ),
            "magnitude",
        ),
        (lambda m, d: hessian_trace(m, F.cross_entropy, d, num_queries=5), "num_queries"),
        (lambda m, d: hessian_trace(m, F.cross_entropy, d, method="exact"), "method"),
    ],
)
def test_bad_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_mlp(batch_norm=False), make_data())


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: hessian_eigenvalues(m, F.cross_entropy, d, k=1),
        lambda m, d: hessian_eigenvalues(m, F.cross_entropy, d, method="power"),
        lambda m, d: hessian_trace(m, F.cross_entropy, d, num_queries=6),
    ],
    ids=["lanczos", "power", "trace"],
)
def test_a_diverged_model_gets_a_clear_error_and_keeps_its_weights(call):
    model = make_mlp(batch_norm=True)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not finite"):
        call(model, make_data())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)


def test_lanczos_restarts_when_the_krylov_space_is_exhausted():
    # A = diag(3, 3, 1, 1): any start vector spans an invariant space of dimension 2
    # (one copy of each distinct eigenvalue); k = 3 needs a restart to find the third.
    a = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    model = Quadratic(a, torch.ones(4, dtype=torch.float64))
    data = (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1))
    result = hessian_eigenvalues(model, mean_output, data, k=3, tol=1e-10)
    assert result.values == pytest.approx([3.0, 3.0, 1.0], rel=1e-12)
    assert result.converged


class _FreshBatchEachPass:
    """An iterable that yields a new random batch on every pass (like augmentation),
    remembering what it yielded."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(7)
        self.yielded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __iter__(self):
        x = torch.randn(12, 4, generator=self.generator, dtype=torch.float64)
        y = torch.randint(0, 3, (12,), generator=self.generator)
        self.yielded.append((x, y))
        yield x, y


def test_data_is_drawn_once_so_every_product_sees_the_same_batch():
    model = make_mlp(batch_norm=True)
    data = _FreshBatchEachPass()
    result = hessian_eigenvalues(model, F.cross_entropy, data, k=2, tol=1e-8)
    assert len(data.yielded) == 1
    exact = torch.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, *data.yielded[0]))
    assert result.converged
    assert result.values == pytest.approx(exact.flip(0)[:2].tolist(), rel=1e-6)


def test_progress_wrapper_sees_one_step_per_product():
    model = make_mlp(batch_norm=False)
    data = make_data()
    steps = []

    def progress(iterable):
        for item in iterable:
            steps.append(item)
            yield item

    trace = hessian_trace(model, F.cross_entropy, data, num_queries=10, progress=progress)
    assert len(steps) == trace.num_queries == 10
    steps.clear()
    eig = hessian_eigenvalues(model, F.cross_entropy, data, max_iter=4, progress=progress)
    assert len(steps) == eig.iterations == 4
