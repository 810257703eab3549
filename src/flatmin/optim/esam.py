r"""ESAM: efficient SAM (Du et al., ICLR 2022, "Efficient Sharpness-aware Minimization for
Improved Training of Neural Networks", arXiv:2110.03141).

Two savings on top of SAM, each optional:

* **Stochastic weight perturbation (SWP).** Each step, every parameter tensor is
  perturbed with probability β (independent Bernoulli draws); the selected tensors
  ``S`` get ``ε_S = ρ·g_S / (β‖g_S‖)``, the others stay at ``w``. A tensor that is not
  perturbed needs no first-pass gradient, so :meth:`~flatmin.SAM.step` freezes it
  (``requires_grad=False``) during the first backward, which skips its weight-gradient
  computation. All tensors get their second-pass gradient and are updated.
* **Sharpness-sensitive data selection (SDS).** After the ascent, one forward pass
  without gradients gives every sample's loss at ``w + ε``; the second forward/backward
  runs only on the ``⌈γ·B⌉`` samples whose loss rose most, ``L_i(w+ε) − L_i(w)``, and
  its mean loss gives the update.

This follows the authors' code (``dydjw9/Efficient_SAM``, ``utils/Esam.py``), where
selection is per tensor, ``‖g‖`` is taken over the perturbed tensors only and the
scale carries the ``1/β``. Differences, deliberate: their draw for step t+1 happens at
the end of step t with Python's global ``random``; here it is a function of
``(seed, step)`` so runs are reproducible, a failed step draws the same subset again
and a checkpoint only needs the counter and the seed. Their selection keeps samples
*strictly* above the ``int(γB)``-th largest value (one sample fewer, none on ties);
here exactly ``⌈γB⌉`` samples (at least one) are kept. No ``1e-7`` is added to ``‖g‖``.
Defaults ``β = 0.6, γ = 0.5, ρ = 0.05`` are the authors' CIFAR ResNet-18 settings
(``run.sh``; 0.5/0.5 and larger ρ for WideResNet and PyramidNet).

**Cost.** A step is a forward/backward at ``w`` (without the weight gradients of the
unperturbed tensors), a no-grad forward of the whole batch at ``w + ε`` and a
forward/backward on ``⌈γB⌉`` samples, so it is cheaper than SAM when that no-grad
forward is cheap next to a training step (``benchmarks/RESULTS.md`` has the figures).

The closure of :meth:`~flatmin.SAM.step` (trait ``per_sample_closure``) takes an optional index
tensor and returns per-sample losses (``reduction="none"``) **without** calling
``backward``; ESAM takes the means and runs the backward passes itself
(:meth:`~flatmin.ESAM.run_first_pass`, :meth:`~flatmin.ESAM.run_second_pass`, which
:func:`flatmin.distributed.sam_step` calls too):

.. test: setup=model

::

    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5,
               lr=0.1, momentum=0.9)
    for x, y in loader:
        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")
        opt.zero_grad()
        loss = opt.step(closure, model=model)   # mean first-pass loss

A SAM-style closure (it calls ``backward`` itself and returns a scalar loss) is also
accepted: SWP applies, but without per-sample losses every sample takes part in the
second pass (a warning says so once when ``gamma < 1``).

The same step written out, for loops that cannot use a closure (``first_step`` drops
the first-pass gradients of the tensors it does not perturb; the context manager only
avoids computing them), for an ``opt`` built as above:

.. test: setup=model

::

    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    with opt.unperturbed_frozen():            # optional: skips unneeded gradients
        before = F.cross_entropy(model(x), y, reduction="none")
        before.mean().backward()
    opt.first_step(zero_grad=True)
    with running_stats_frozen(model):
        with torch.no_grad():
            after = F.cross_entropy(model(x), y, reduction="none")
        idx = opt.select_samples(before.detach(), after)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.second_step(zero_grad=True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from flatmin.optim._base import OptimizerFactory
from flatmin.optim._buckets import Bucket
from flatmin.optim._checks import check_int, check_real
from flatmin.optim._entry import step_entry
from flatmin.optim.sam import SAM

_MASK64 = (1 << 64) - 1


class ESAM(SAM):
    """Efficient SAM: stochastic weight perturbation and sharpness-sensitive data selection.

    Args:
        params: parameters or param groups.
        base_optimizer: the optimizer to wrap (a class such as ``torch.optim.SGD``, or a
            callable that builds one; see :class:`~flatmin.optim.sam.SAM`).
        rho: radius ρ (before the ``1/β`` rescaling).
        beta: probability β ∈ (0, 1] that a parameter tensor is perturbed (1: all).
        gamma: fraction γ ∈ (0, 1] of the batch in the second pass (1: all samples).
        seed: seed of the per-step subset draws (default: drawn from torch's global
            generator, so ``torch.manual_seed`` makes it reproducible).
        freeze_unperturbed: let :meth:`~flatmin.SAM.step` skip the first-pass gradients of the
            tensors it leaves unperturbed.
        **kwargs: SAM options and the base optimizer's keyword arguments.

    ``state_dict()`` keeps ``steps_done`` and ``seed`` in every param group.

    Attributes:
        sample_gather: ``None``, or a collective that all-gathers a per-sample tensor
            over the data-parallel processes and returns ``(the concatenation in rank
            order, this process's offset in it, the number of processes)``. When set,
            the second pass selects the ``⌈γ·B⌉`` samples of the *global* batch ``B``
            whose loss rose most; each process runs its own selected rows ``S_r`` with
            the loss ``(W/|S|)·Σ_{i∈S_r} ℓ_i``, so the gradient averaged over the ``W``
            processes is ``mean_{i∈S} ∇ℓ_i``, as on one process with the whole batch (a
            process none of whose rows is selected runs one row with weight 0, so that
            its backward still takes part in the collectives).
            :func:`flatmin.distributed.sam_step` sets it for the duration of a step
            on a sharded (FSDP2) model; leave it ``None`` otherwise.
    """

    per_sample_closure = True
    _group_keys = ("steps_done", "seed")

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: OptimizerFactory,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        *,
        seed: int | None = None,
        freeze_unperturbed: bool = True,
        **kwargs: Any,
    ) -> None:
        beta = _check_fraction("beta", beta, "probability that a tensor is perturbed", 0.6)
        gamma = _check_fraction("gamma", gamma, "fraction of the batch in the second pass", 0.5)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        check_int("seed", seed)
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.seed = int(seed)
        self.freeze_unperturbed = freeze_unperturbed
        self.steps_done = 0
        self._warned_scalar_loss = False
        self.sample_gather: Callable[[Tensor], tuple[Tensor, int, int]] | None = None

    def _clear_transient(self) -> None:
        super()._clear_transient()
        self._perturb_nothing = False
        self._first_losses: Tensor | None = None

    # -- stochastic weight perturbation ---------------------------------------------------

    def perturbed_subset(self) -> list[bool]:
        """Which parameter tensors (in param-group order) the current step perturbs."""
        params = self._params()
        generator = torch.Generator().manual_seed(_splitmix64(self.seed, self.steps_done))
        return (torch.rand(len(params), generator=generator) < self.beta).tolist()

    @contextmanager
    def unperturbed_frozen(self) -> Iterator[None]:
        """During the first pass: the tensors this step leaves unperturbed do not
        require gradients, so backward skips their weight gradients. Optional; the
        step's result is the same without it."""
        frozen = [
            p
            for p, chosen in zip(self._params(), self.perturbed_subset())
            if not chosen and p.requires_grad
        ]
        if len(frozen) == sum(p.requires_grad for p in self._params()):
            frozen = []  # nothing perturbed: keep every gradient (ε = 0 this step)
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _before_first_step(self) -> None:
        """Drop the first-pass gradients of unperturbed tensors: they get ``ε = 0`` and
        stay out of ``‖g_S‖``. If no perturbed tensor has a gradient, nothing moves."""
        chosen = list(zip(self._params(), self.perturbed_subset()))
        self._perturb_nothing = not any(keep and p.grad is not None for p, keep in chosen)
        if not self._perturb_nothing:
            for p, keep in chosen:
                if not keep:
                    p.grad = None

    def _perturb(self, bucket: Bucket, weighted: list[Tensor], scale: Tensor) -> None:
        """``w ← w + ε_S`` with ``ε_S = scale/β · T ⊙ (T ⊙ g_S)``: SAM's ascent times ``1/β``."""
        if self._perturb_nothing:
            scale = torch.zeros_like(scale)
        super()._perturb(bucket, weighted, scale / self.beta)

    # -- sharpness-sensitive data selection --------------------------------------------------

    def select_samples(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """Indices of the ``⌈γ·B⌉`` samples whose loss rose most from ``w`` to ``w + ε``."""
        if loss_before.shape != loss_after.shape or loss_before.ndim != 1:
            raise ValueError(
                "select_samples needs per-sample losses of one batch (1-D, same shape; use "
                f"reduction='none'), got shapes {tuple(loss_before.shape)} and "
                f"{tuple(loss_after.shape)}"
            )
        rise = loss_after.detach() - loss_before.detach()
        return torch.topk(rise, self._selection_size(rise.numel())).indices

    def _selection_size(self, batch: int) -> int:
        return max(1, math.ceil(self.gamma * batch - 1e-9))

    def _select_over_processes(
        self, loss_before: Tensor, loss_after: Tensor
    ) -> tuple[Tensor, float]:
        """This process's rows of the global batch's selection and their loss weight
        ``W/|S|`` (see :attr:`sample_gather`)."""
        rise = loss_after.detach() - loss_before.detach()
        every, offset, processes = self.sample_gather(rise)
        chosen = torch.topk(every, self._selection_size(every.numel())).indices
        mine = chosen[(chosen >= offset) & (chosen < offset + rise.numel())] - offset
        if mine.numel() == 0:
            return torch.zeros(1, dtype=torch.long, device=rise.device), 0.0
        return mine, processes / chosen.numel()

    # -- driving a step -------------------------------------------------------------------

    @step_entry
    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        super().second_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
        self.steps_done += 1

    @step_entry
    def run_first_pass(
        self,
        closure: Callable[..., Tensor],
        *,
        skip_unused_gradients: bool = True,
        grad_scaler: Any = None,
    ) -> Tensor:
        """The first pass at ``w``: ``closure()`` gives per-sample losses, whose mean's
        gradient is taken here; returns that mean (detached). With
        ``freeze_unperturbed`` and ``skip_unused_gradients`` the tensors this step leaves
        unperturbed are frozen meanwhile (a synchronizing DDP backward needs every
        gradient, so :func:`~flatmin.distributed.sam_step` turns it off there). A
        SAM-style closure (backward inside, scalar loss) is run as it is. With a
        ``grad_scaler`` the mean loss is scaled before the backward."""
        freeze = self.freeze_unperturbed and skip_unused_gradients
        with self.unperturbed_frozen() if freeze else nullcontext():
            before = closure()
            per_sample = isinstance(before, Tensor) and before.ndim > 0
            if per_sample:
                _scaled(before.mean(), grad_scaler).backward()
        if per_sample:
            self._first_losses = before.detach()
            return self._first_losses.mean()
        if self.gamma < 1 and not self._warned_scalar_loss:
            self._warned_scalar_loss = True
            warnings.warn(
                "ESAM's closure returned a scalar loss: data selection needs per-sample "
                "losses (reduction='none', no backward in the closure); every sample takes "
                "part in the second pass",
                stacklevel=3,
            )
        self._first_losses = None
        return before

    @step_entry
    def run_second_pass(self, closure: Callable[..., Tensor], *, grad_scaler: Any = None) -> None:
        """The second pass at ``w + ε``: with ``gamma < 1`` a no-grad forward of the batch
        picks the ``⌈γB⌉`` samples whose loss rose most (:meth:`select_samples`), and the
        gradient of their mean loss is taken; with ``gamma = 1`` every sample's (the mean
        scaled by ``grad_scaler`` if given)."""
        before = self._first_losses
        if before is None:
            closure()
        elif self.gamma < 1:
            with torch.no_grad():
                after = closure()
            if self.sample_gather is None:
                loss = closure(self.select_samples(before, after)).mean()
            else:
                rows, weight = self._select_over_processes(before, after)
                loss = closure(rows).sum() * weight
            _scaled(loss, grad_scaler).backward()
        else:
            _scaled(closure().mean(), grad_scaler).backward()

    # -- checkpointing ------------------------------------------------------------------

    def _group_extras(self) -> dict[str, Any]:
        """The step counter and the seed: together they fix every future subset."""
        return {"steps_done": self.steps_done, "seed": self.seed}

    def _load_method_state(
        self, per_param: dict[Tensor, dict[str, Tensor]], values: dict[str, Any]
    ) -> None:
        self.steps_done = int(values["steps_done"])
        self.seed = int(values["seed"])


def _scaled(loss: Tensor, grad_scaler: Any) -> Tensor:
    return loss if grad_scaler is None else grad_scaler.scale(loss)


def _splitmix64(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for step ``step`` of the stream ``seed`` (SplitMix64)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _check_fraction(name: str, value: Any, meaning: str, default: float) -> float:
    return check_real(
        name,
        value,
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
        hint=f"the {meaning}; ESAM's default is {default}",
    )
