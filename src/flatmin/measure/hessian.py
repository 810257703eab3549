"""Hessian eigenvalues and trace of the loss, from Hessian-vector products only.

The Hessian ``H = ∇²L(w)`` of the batch-size-weighted mean loss over the trainable
parameters is never formed: ``H·v = ∇_w (∇_w L(w) · v)`` (Pearlmutter, 1994) by double
backward, one batch at a time.

- Eigenvalues: Lanczos with full reorthogonalization (Lanczos, 1950; Golub & Van Loan,
  *Matrix Computations*, §10.1) or power iteration with deflation. Convergence is
  judged by the residual ``‖H·y − θ·y‖₂ ≤ tol·‖H‖`` of each Ritz pair ``(θ, y)``, which
  bounds the eigenvalue error ``|θ − λ| ≤ ‖H·y − θ·y‖₂``; the returned residuals are
  recomputed with one extra product each, not the Lanczos estimate.
- Trace: Hutchinson's estimator ``tr H ≈ (1/q) Σ zᵢᵀ H zᵢ`` with Rademacher ``zᵢ``
  (Hutchinson, 1989) and Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021), which
  takes the trace of a sketched top subspace exactly and applies Hutchinson only to
  the rest. Both report a standard error from the spread of their random terms.

Randomness comes from a ``torch.Generator`` seeded with ``seed``; the global RNG is not
touched. Lanczos keeps ``max_iter + 1`` vectors of the parameters' size, Hutch++
``2·⌊q/3⌋``, Hutchinson one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from flatmin.measure._state import measuring, trainable_parameters
from flatmin.measure.batches import (
    Batch,
    LossFn,
    batch_loss,
    collect_batches,
    model_device,
    num_samples,
)
from flatmin.optim._checks import check_choice, check_int, check_real

Progress = Callable[[Iterable], Iterable]
Which = Literal["largest", "smallest", "magnitude"]


@dataclass(frozen=True)
class EigenResult:
    """Eigenvalue estimates of the loss Hessian.

    ``values`` are ordered as asked (largest first for ``which="largest"``);
    ``residuals[i] = ‖H·yᵢ − θᵢ·yᵢ‖₂`` bounds the error of ``values[i]``;
    ``iterations`` counts Hessian-vector products; ``converged`` is true when every
    residual is at most ``tol`` times the largest ``|θ|``.
    """

    values: list[float]
    residuals: list[float]
    iterations: int
    converged: bool
    method: str
    which: str
    tol: float
    num_samples: int
    seed: int


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its standard error and the number of products used."""

    value: float
    stderr: float
    method: str
    num_queries: int
    num_samples: int
    seed: int


class HessianOperator:
    """``v ↦ H·v`` for the mean loss over fixed batches, on flat parameter vectors."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        params: Sequence[Tensor],
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.params = list(params)
        self.total = num_samples(batches)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_products = 0

    def __call__(self, vector: Tensor) -> Tensor:
        if vector.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(vector.shape)}")
        pieces = [v.view_as(p) for v, p in zip(vector.split(self._sizes()), self.params)]
        result = [torch.zeros_like(p) for p in self.params]
        for batch in self.batches:
            with torch.enable_grad():
                loss = batch_loss(self.model, self.loss_fn, batch) * (batch.size / self.total)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                dot = sum(
                    (g * v).sum() for g, v in zip(grads, pieces, strict=True) if g is not None
                )
                if not isinstance(dot, Tensor) or not dot.requires_grad:
                    continue  # the gradient does not depend on w: this batch adds H = 0
                products = torch.autograd.grad(dot, self.params, allow_unused=True)
            for acc, hv in zip(result, products, strict=True):
                if hv is not None:
                    acc.add_(hv)
        self.num_products += 1
        product = torch.cat([r.reshape(-1) for r in result])
        if not bool(torch.isfinite(product).all()):
            raise ValueError(
                "the Hessian-vector product is not finite (NaN or inf): expected a model "
                "with finite weights and a finite loss on the batches"
            )
        return product

    def _sizes(self) -> list[int]:
        return [p.numel() for p in self.params]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(check_int("seed", seed))


def _random_unit(op: HessianOperator, generator: torch.Generator) -> Tensor:
    v = torch.randn(op.dim, generator=generator, dtype=op.dtype).to(op.device)
    return v / torch.linalg.vector_norm(v)


def _rademacher(op: HessianOperator, count: int, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, (count, op.dim), generator=generator, dtype=op.dtype)
    return (2 * signs - 1).to(op.device)


def _order(values: Tensor, which: str) -> Tensor:
    if which == "largest":
        return torch.argsort(values, descending=True)
    if which == "smallest":
        return torch.argsort(values)
    return torch.argsort(values.abs(), descending=True)


def _iterate(count: int, progress: Progress | None) -> Iterable[int]:
    return progress(range(count)) if progress is not None else range(count)


def _lanczos(
    op: HessianOperator,
    k: int,
    which: str,
    max_iter: int,
    tol: float,
    generator: torch.Generator,
    progress: Progress | None,
) -> tuple[Tensor, Tensor, float]:
    """Ritz values and vectors ``(θ, Y)`` of the ``k`` wanted eigenpairs, and ``max|θ|``.

    Lanczos with full reorthogonalization (done twice, which suffices in floating
    point): ``β_j q_{j+1} = H q_j − α_j q_j − β_{j−1} q_{j−1}``, ``T_j`` tridiagonal with
    diagonal ``α`` and off-diagonal ``β``. The residual of a Ritz pair from
    ``T_j = S Θ Sᵀ`` is ``|β_j · S_{j,i}|``; iteration stops when the ``k`` wanted
    pairs all have residual ``≤ tol·max|θ|``. When ``β_j`` vanishes the Krylov space is
    invariant and its Ritz values are exact; if it holds fewer than ``k`` of them the
    iteration restarts from a random vector orthogonal to it (``β_j = 0``), otherwise it
    stops. Like every single-vector Krylov method, it finds one copy of an eigenvalue
    of multiplicity > 1 unless such a restart happens.
    """
    steps = min(max_iter, op.dim)
    basis = torch.zeros(steps + 1, op.dim, dtype=op.dtype, device=op.device)
    basis[0] = _random_unit(op, generator)
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(op.dtype).eps
    coefficients = torch.zeros(0, 0, dtype=torch.float64)
    thetas = torch.zeros(0, dtype=torch.float64)
    for j in _iterate(steps, progress):
        w = op(basis[j])
        alphas.append(float(basis[j] @ w))
        w = _orthogonalize(w, basis[: j + 1])
        beta = float(torch.linalg.vector_norm(w))
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        thetas, coefficients = torch.linalg.eigh(tridiagonal)
        scale = float(thetas.abs().max())
        wanted = _order(thetas, which)[:k]
        estimates = (beta * coefficients[-1, wanted]).abs()
        invariant = beta <= eps * max(scale, eps) * math.sqrt(op.dim)
        if invariant and j + 1 < k:
            beta, w = 0.0, _orthogonalize(_random_unit(op, generator), basis[: j + 1])
        elif invariant or (j + 1 >= k and bool((estimates <= tol * scale).all())):
            break
        betas.append(beta)
        basis[j + 1] = w / torch.linalg.vector_norm(w)
    size = len(alphas)
    wanted = _order(thetas, which)[:k]
    vectors = coefficients[:, wanted].to(op.dtype).to(op.device).T @ basis[:size]
    return thetas[wanted], vectors, float(thetas.abs().max())


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """``w`` minus its projection on the rows of ``basis``, done twice for stability."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _power(
    op: HessianOperator,
    k: int,
    max_iter: int,
    tol: float,
    generator: torch.Generator,
    progress: Progress | None,
) -> tuple[Tensor, Tensor, float]:
    """Power iteration with deflation: the ``k`` eigenpairs of largest ``|λ|``, and ``max|θ|``.

    Each pair iterates ``v ← P H P v / ‖P H P v‖`` with ``P`` the projector off the
    pairs already found, until ``‖H v − θ v‖ ≤ tol·max|θ|``, ``θ = vᵀ H v``, or for
    ``max_iter`` products.
    """
    found: list[Tensor] = []
    values: list[float] = []
    for _ in range(k):
        v = _random_unit(op, generator)
        theta = 0.0
        for _ in _iterate(max_iter, progress):
            v = _deflate(v, found)
            v = v / torch.linalg.vector_norm(v)
            hv = _deflate(op(v), found)
            theta = float(v @ hv)
            scale = max([abs(theta), *(abs(x) for x in values)])
            if float(torch.linalg.vector_norm(hv - theta * v)) <= tol * scale:
                break
            norm = torch.linalg.vector_norm(hv)
            if norm == 0:
                break
            v = hv / norm
        found.append(v)
        values.append(theta)
    thetas = torch.tensor(values, dtype=torch.float64)
    return thetas, torch.stack(found), float(thetas.abs().max())


def _deflate(v: Tensor, found: Sequence[Tensor]) -> Tensor:
    for u in found:
        v = v - (u @ v) * u
    return v


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    k: int = 1,
    method: Literal["lanczos", "power"] = "lanczos",
    *,
    which: Which | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    max_batches: int | None = None,
    train_mode_bn: bool = False,
    progress: Progress | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenvalues of the loss Hessian over the trainable parameters.

    Args:
        k: how many eigenvalues.
        method: ``"lanczos"`` (full reorthogonalization; default) or ``"power"``.
        which: ``"largest"`` (algebraic; Lanczos' default), ``"smallest"`` or
            ``"magnitude"`` (power iteration's only and default choice).
        max_iter: at most this many Lanczos steps, or products per eigenvalue for power
            iteration; ``converged`` is False when it was not enough.
        tol: relative residual tolerance, ``‖H·y − θ·y‖₂ ≤ tol·max|θ|``.
        seed: seeds the starting vectors (a private generator; the global RNG is untouched).
        max_batches, train_mode_bn, progress: as in :func:`~flatmin.measure.sam_sharpness`.

    Example, the three largest eigenvalues, largest first, with their residuals:

    .. test: setup=model

    >>> eig = hessian_eigenvalues(model, loss_fn, loader, k=3)
    >>> len(eig.values), eig.values[0] >= eig.values[1] >= eig.values[2], eig.converged
    (3, True, True)
    """
    check_int("k", k, minimum=1)
    check_int("max_iter", max_iter, minimum=1)
    check_real("tol", tol, minimum=0.0, exclusive_minimum=True)
    check_choice("method", method, ("lanczos", "power"))
    which = which or ("largest" if method == "lanczos" else "magnitude")
    check_choice("which", which, ("largest", "smallest", "magnitude"))
    if method == "power" and which != "magnitude":
        raise ValueError("power iteration finds the eigenvalues of largest magnitude only")
    generator = _generator(seed)
    with measuring(model, train_mode_bn):
        batches = collect_batches(data, max_batches, model_device(model))
        op = HessianOperator(model, loss_fn, batches, [p for _, p in trainable_parameters(model)])
        if k > op.dim:
            raise ValueError(f"k={k} exceeds the number of parameters ({op.dim})")
        if method == "lanczos":
            thetas, vectors, scale = _lanczos(op, k, which, max_iter, tol, generator, progress)
        else:
            thetas, vectors, scale = _power(op, k, max_iter, tol, generator, progress)
        iterations = op.num_products
        residuals = [
            float(torch.linalg.vector_norm(op(y) - float(theta) * y))
            for theta, y in zip(thetas, vectors, strict=True)
        ]
    return EigenResult(
        values=[float(t) for t in thetas],
        residuals=residuals,
        iterations=iterations,
        converged=all(r <= tol * scale for r in residuals),
        method=method,
        which=which,
        tol=tol,
        num_samples=num_samples(batches),
        seed=seed,
    )


def _hutchinson(
    op: HessianOperator, queries: int, generator: torch.Generator, progress: Progress | None
) -> tuple[float, float]:
    samples = []
    for _ in _iterate(queries, progress):
        z = _rademacher(op, 1, generator)[0]  # one at a time: q·dim floats would not fit
        samples.append(z @ op(z))
    return _mean_and_stderr(torch.stack(samples))


def _hutch_plus_plus(
    op: HessianOperator, queries: int, generator: torch.Generator, progress: Progress | None
) -> tuple[float, float]:
    """``tr(QᵀHQ) + mean_i gᵢᵀ(I−QQᵀ)H(I−QQᵀ)gᵢ``, ``Q = orth(H S)`` (Hutch++, Alg. 1).

    ``S`` has ``⌊q/3⌋`` Rademacher columns, the remaining products go to ``QᵀHQ`` and
    to the probes ``gᵢ``. Given ``Q`` the estimate is unbiased, and its standard error
    is that of the Hutchinson part, ``std(gᵢᵀ…gᵢ)/√n_g``.
    """
    sketch_size = min(queries // 3, op.dim)
    steps = iter(_iterate(queries, progress))
    sketch = _rademacher(op, sketch_size, generator)
    images = torch.stack([op(s) for s, _ in zip(sketch, steps)])
    basis, _ = torch.linalg.qr(images.T)
    exact_part = sum(float(q @ op(q)) for q, _ in zip(basis.T, steps))
    samples = []
    for _ in steps:
        g = _rademacher(op, 1, generator)[0]
        residual = g - basis @ (basis.T @ g)
        samples.append(residual @ op(residual))
    mean, stderr = _mean_and_stderr(torch.stack(samples))
    return exact_part + mean, stderr


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    values = samples.double()
    return float(values.mean()), float(values.std(correction=1) / math.sqrt(len(values)))


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    num_queries: int = 99,
    *,
    seed: int = 0,
    max_batches: int | None = None,
    train_mode_bn: bool = False,
    progress: Progress | None = None,
) -> TraceResult:
    """An unbiased estimate of ``tr ∇²L(w)`` from ``num_queries`` Hessian-vector products.

    Args:
        method: ``"hutch++"`` (default; lower variance when a few eigenvalues dominate)
            or ``"hutchinson"``.
        num_queries: Hessian-vector products to spend (Hutch++ needs at least 6: two
            probes for its standard error).
        seed: seeds the Rademacher probes (a private generator).
        max_batches, train_mode_bn, progress: as in :func:`~flatmin.measure.sam_sharpness`.

    Example:

    .. test: setup=model

    >>> trace = hessian_trace(model, loss_fn, loader, num_queries=30, seed=0)
    >>> trace.method, trace.num_queries, trace.stderr > 0
    ('hutch++', 30, True)
    """
    check_choice("method", method, ("hutch++", "hutchinson"))
    check_int("num_queries", num_queries, minimum=6 if method == "hutch++" else 2)
    generator = _generator(seed)
    with measuring(model, train_mode_bn):
        batches = collect_batches(data, max_batches, model_device(model))
        op = HessianOperator(model, loss_fn, batches, [p for _, p in trainable_parameters(model)])
        estimate = _hutch_plus_plus if method == "hutch++" else _hutchinson
        value, stderr = estimate(op, num_queries, generator, progress)
    return TraceResult(
        value=value,
        stderr=stderr,
        method=method,
        num_queries=op.num_products,
        num_samples=num_samples(batches),
        seed=seed,
    )
