r"""SAM, ASAM, USAM and StableSAM: the two-pass engine of the SAM family.

(:class:`~flatmin.optim.presets.ASAM` and :class:`~flatmin.optim.presets.StableSAM` are
this class with their papers' options and defaults.)

Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv:2010.01412) solves
``min_w max_{‖ε‖₂≤ρ} L(w+ε)`` with one ascent step per update:

.. math::

    g = ∇L_B(w), \quad ε = ρ\,\frac{T^2 g}{\lVert T g\rVert_2}, \quad
    g_s = ∇L_B(w+ε), \quad w ← \mathrm{base\_step}(w, g_s)

with ``T = 1`` for SAM, the ASAM scaling ``T`` in adaptive mode, no normalisation for
USAM (``ε = ρ T² g``). Norms are global over every parameter that has a gradient; ρ may
differ per param group.

Adaptive forms (name the one you use when you report results):

* ``adaptive="weights"`` — the official ASAM (Kwon et al., ICML 2021):
  ``T_w = |w| + η`` on weight tensors, ``T = 1`` on every other parameter, η = 0.01
  by default; recommended ρ = 0.5 (CIFAR-10), 1.0 (CIFAR-100). Pass
  ``model.named_parameters()`` to apply the official name rule (``'weight' in name``,
  see ``flatmin.optim._buckets.is_adaptive_weight``).
* ``adaptive="all"`` — the popular PyTorch port: ``T_w = |w| + η`` on every parameter,
  η = 0 by default; its recommended ρ is about 2.0.

StableSAM (Tan et al., 2024, arXiv:2401.07250), ``stable=True``: the update direction
``d`` (``g_s`` for SAM; each member's own direction for GSAM and LookSAM) is rescaled so
that its norm is the clean gradient's,

.. math::

    d ← γ\,d, \qquad γ = \frac{\lVert T g\rVert_2}{\lVert T d\rVert_2},

capped at 1 with ``stable_cap=True``, ``T`` the adaptive scaling (1 without it). Both
norms use the ``T`` of the weights ``w`` that the update is applied to. The authors'
code takes ``‖T g_s‖`` with the ``T`` of ``w + ε``, mixing two metrics: with a constant
gradient (``g_s = g``) it still rescales the update by ``‖T(w) g‖/‖T(w+ε) g‖``, where
here ``γ = 1``. They use it on top of USAM (``normalize=False``), SAM and ASAM.

Two ways to drive a step:

.. test: setup=sam

::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
    loss = opt.step(closure)                   # closure: forward + backward, returns loss

    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)             # w ← w + ε (a copy of w is kept)
    with running_stats_frozen(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)            # w ← saved copy, then the base step

``model=`` (given once to the constructor, or to ``step``) keeps the model's BatchNorm
statistics to the first pass; a framework that calls ``optimizer.step(closure)`` itself
(Lightning, accelerate) then gets this without passing anything.

Mixed precision: pass a ``torch.amp.GradScaler`` to both passes, or to ``step``
(``flatmin.optim._grad_scaler``). Gradient accumulation: ``backward`` on every
micro-batch before each of the two steps, or every micro-batch inside the one closure of
``step``; ε comes from the accumulated gradient. ``step(closure)`` refuses gradients accumulated *outside* its
closure (``flatmin.optim._accumulation``). ``max_grad_norm`` clips the final
direction, after unscaling, before the base step.

The base optimizer is stepped directly (``base_optimizer.step()``): LR schedulers and
step hooks attached to the SAM optimizer see one ``step`` per ``step(closure)``, and
the explicit passes count as a step for the scheduler's order check. The step methods
run eagerly and on the real optimizer when reached through a framework's proxy
(``flatmin.optim._entry``).

``state_dict()`` has torch's layout (``flatmin.optim._state_dict``); resuming from it
is bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.optim._base import OptimizerFactory, build_base, check_factory
from flatmin.optim._buckets import (
    Bucket,
    adaptive_scale,
    clip_gradients_,
    global_norm,
    make_buckets,
    mark_nonfinite_,
    scale_gradients_,
    shards_of,
    weighted,
)
from flatmin.optim._buffers import ReusableBuffers
from flatmin.optim._closure_step import ClosureStep
from flatmin.optim._entry import step_entry
from flatmin.optim._grad_scaler import check_same_scaler, scale_of, unscale_and_check
from flatmin.optim._settings import (
    DEFAULT_ETA,
    check_engine_options,
    check_eta_has_a_form,
    check_group_eta_has_a_form,
    check_group_settings,
)
from flatmin.optim._state_dict import MethodStateDict


class SAM(MethodStateDict, ClosureStep, Optimizer):
    """Sharpness-Aware Minimization wrapping any ``torch.optim.Optimizer`` class.

    Args:
        params: parameters or param groups (named parameters are accepted and let the
            official ASAM rule tell weights from other parameters by name).
        base_optimizer: the optimizer to wrap: a class such as ``torch.optim.SGD``, or
            any callable ``f(param_groups, **base_kwargs)`` that builds one over exactly
            these parameters (``functools.partial``, timm's optimizer factories).
        rho: neighbourhood radius ρ ≥ 0 (per group allowed).
        adaptive: ``None`` (SAM), ``"weights"`` (official ASAM) or ``"all"`` (the
            popular port's form); per group allowed.
        stable: StableSAM's renormalisation of the update direction.
        normalize: ``False`` gives unnormalised SAM (USAM): ``ε = ρ·T²g``.
        eta: ASAM's η in ``T_w = |w| + η`` (per group allowed); ``None`` takes the
            form's default, 0.01 for ``"weights"`` and 0 for ``"all"``. Refused without
            an adaptive form, where it would have no effect.
        stable_cap: cap StableSAM's factor at 1 (needs ``stable=True``).
        max_grad_norm: clip the final direction's global L2 norm to this value.
        skip_nonfinite: without a GradScaler, skip the step when the first-pass gradient
            is not finite (costs one host synchronisation per step). With a GradScaler
            the skip is always on and free.
        model: the module whose BatchNorm statistics ``step(closure)`` keeps to the
            first pass (``step(closure, model=...)`` overrides it for one step). The
            optimizer keeps a reference to it.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, …).

    Example:

    .. test: setup=model

    ::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                  model=model)
        loss = opt.step(lambda: (l := loss_fn(model(x), y)).backward() or l)

    Traits (what code driving any member of the family relies on):
        uses_clean_gradient: True when the update uses the first-pass gradient ``g``
            besides ``g_s`` — here when ``stable`` (StableSAM's ``‖T g‖``); always for
            GSAM and LookSAM. :func:`flatmin.distributed.sam_step` then averages each
            process's final direction instead of the surrogate gradient.
        per_sample_closure: False: ``step``'s closure runs forward and backward and
            returns the loss. True for ESAM, whose closure returns per-sample losses.

    Attributes:
        replica_mean: ``None``, or a collective that replaces a list of tensors in place
            by their mean over data-parallel replicas. When set, every gradient the base
            step will apply is passed to it at the start of the update — after the
            method's own transformation (StableSAM's ``γ``, GSAM's projection), before
            clipping and the base step. :func:`flatmin.distributed.sam_step` sets it
            during a step with per-process ε; leave it ``None`` otherwise.
    """

    per_sample_closure = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: OptimizerFactory,
        rho: float = 0.05,
        adaptive: str | None = None,
        stable: bool = False,
        *,
        normalize: bool = True,
        eta: float | None = None,
        stable_cap: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_factory(base_optimizer, SAM)
        params = list(params)
        check_engine_options(params, model, max_grad_norm, stable, stable_cap)
        check_group_settings(dict(rho=rho, adaptive=adaptive, eta=eta))
        self.normalize = normalize
        self.stable = stable
        self.stable_cap = stable_cap
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.model = model
        self.replica_mean: Callable[[list[Tensor]], None] | None = None
        self._buffers = ReusableBuffers()
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta))
        self.base_optimizer = build_base(base_optimizer, self.param_groups, base_kwargs, SAM)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:  # a factory may have built its own group dicts
            self._complete_group(group)
        self.defaults.update(self.base_optimizer.defaults)
        check_eta_has_a_form(self.param_groups, eta)
        self._register_state_dict_hooks()
        self._clear_transient()

    @property
    def uses_clean_gradient(self) -> bool:
        """True when the update uses the first-pass gradient (StableSAM's ``‖T g‖``)."""
        return self.stable

    @property
    def is_perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step`` (weights are at ``w + ε``)."""
        return self._backup is not None

    @step_entry
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does; its ρ, adaptive form and η are checked first."""
        check_group_eta_has_a_form(param_group, self.defaults["adaptive"])
        self._complete_group(param_group)
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            super().add_param_group(param_group)
        else:
            self.base_optimizer.add_param_group(param_group)

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Give a group the constructor's ρ, adaptive form and η where it has none, check
        them, and fill in the adaptive form's default η."""
        for key in ("rho", "adaptive", "eta"):
            group.setdefault(key, self.defaults[key])
        self._check_group(group)
        if group["eta"] is None and group["adaptive"] is not None:
            group["eta"] = DEFAULT_ETA[group["adaptive"]]

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise a clear error for a param group whose SAM settings are unusable."""
        check_group_settings(group)

    def _clear_transient(self) -> None:
        self._buckets: list[Bucket] | None = None
        self._backup: list[list[Tensor]] | None = None
        self._grad_norm: Tensor | None = None
        self._first_finite: Tensor | None = None
        self._first_scaler: Any = None

    def _params(self) -> list[Tensor]:
        """Every parameter, in param-group order (the state dict's numbering)."""
        return [p for group in self.param_groups for p in group["params"]]

    def _reference_device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    # -- the two passes ------------------------------------------------------------

    @step_entry
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Move to ``w + ε`` computed from the gradient now in ``.grad``; keep ``w``.

        Args:
            zero_grad: set the gradients to None afterwards, ready for the second pass.
            grad_scaler: the ``torch.amp.GradScaler`` that scaled this pass's loss, if
                any: ε is taken from the unscaled gradient (the scale is divided out of
                USAM's ``ε = ρ·T²g``). Pass the same scaler to :meth:`second_step`.

        Example (mixed precision on a CPU; ``"cuda"`` on a GPU, with ``torch.float16``):

        .. test: setup=model

        ::

            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, normalize=False)
            scaler = torch.amp.GradScaler("cpu")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                scaler.scale(loss_fn(model(x), y)).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            with torch.autocast("cpu", dtype=torch.bfloat16), running_stats_frozen(model):
                scaler.scale(loss_fn(model(x), y)).backward()
            opt.second_step(zero_grad=True, grad_scaler=scaler)
            scaler.update()
        """
        if self.is_perturbed:
            raise RuntimeError(
                "first_step() was called twice; call second_step() or restore_weights() "
                "before the next first_step()"
            )
        self._before_first_step()
        buckets = make_buckets(self.param_groups)
        if not buckets:
            raise RuntimeError(
                "first_step() found no gradients: call loss.backward() before first_step()"
            )
        device = self._reference_device()
        weighted_grads = [weighted(b, b.grads) for b in buckets]
        grad_norm = global_norm(weighted_grads, device, shards_of(buckets))
        finite = torch.isfinite(grad_norm)
        self._after_first_gradient(buckets, grad_norm)
        if self.normalize:
            factor = torch.where(finite & (grad_norm > 0), 1.0 / grad_norm, 0.0)
        else:
            factor = torch.where(finite, 1.0, 0.0).to(grad_norm.dtype)
            factor = factor / scale_of(grad_scaler, device)
        self._backup = self._buffers.get("w", buckets)
        for b, saved, wg in zip(buckets, self._backup, weighted_grads):
            torch._foreach_copy_(saved, b.params)
            scale = (factor * b.group["rho"]).to(b.device, b.params[0].dtype)
            self._perturb(b, wg, scale)
        self._buckets = buckets
        self._grad_norm = grad_norm
        self._first_finite = finite
        self._first_scaler = grad_scaler
        if zero_grad:
            self.zero_grad()

    @step_entry
    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Restore ``w`` exactly and apply the base optimizer with the update direction.

        Args:
            zero_grad: set the gradients to None afterwards.
            grad_scaler: the ``torch.amp.GradScaler`` of both passes (the one given to
                :meth:`first_step`): the gradients are unscaled once, and the step is
                skipped, weights and optimizer state untouched, when either pass gave a
                non-finite gradient. Call ``scaler.update()`` afterwards. A scaler that
                ``first_step`` did not get is refused, the weights left at ``w + ε``.
        """
        if not self.is_perturbed:
            raise RuntimeError("second_step() needs a first_step() before it")
        check_same_scaler(self._first_scaler, grad_scaler)
        with torch.no_grad():
            buckets = self._buckets
            for b in buckets:
                b.refresh_grads()
            self.restore_weights()
            self._update_direction(buckets)
            finite = self._first_finite
        self._apply_update(buckets, finite, grad_scaler, self._grad_norm)
        self._clear_transient()
        if zero_grad:
            self.zero_grad()

    def _apply_update(
        self, buckets: list[Bucket], finite: Tensor, grad_scaler: Any, clean_norm: Tensor
    ) -> None:
        """Apply the base optimizer to the direction ``d`` now in ``.grad`` (renormalised
        with ``stable``, averaged over replicas by :attr:`replica_mean` if set, unscaled,
        clipped), or skip it when ``finite`` is false; LookSAM's reuse steps use it too.
        ``clean_norm`` is ``‖T g‖`` over ``buckets``, the tensors of the first pass."""
        if self.stable:
            with torch.no_grad():
                self._renormalize(buckets, clean_norm)
        if grad_scaler is not None:
            mark_nonfinite_(buckets, finite)  # before averaging: a NaN reaches every replica
        if self.replica_mean is not None:
            self.replica_mean([p.grad for p in self._params() if p.grad is not None])
        if grad_scaler is not None:
            take = unscale_and_check(grad_scaler, self, finite.device)
        else:
            take = not self.skip_nonfinite or bool(finite)
        if take:
            self._clip()
            self.base_optimizer.step()
            self._opt_called = True  # what torch's LR schedulers check for a step

    @step_entry
    @torch.no_grad()
    def fold_first_pass_check(self) -> None:
        """Make the gradients now in ``.grad`` non-finite if the first pass's were.

        For a caller whose own GradScaler unscales and steps after the second backward,
        with an optimizer whose ``step()`` is :meth:`second_step` (transformers' Trainer
        through :class:`flatmin.integrations.transformers.FlatminTrainer`): the scaler
        then skips the step, and lowers its scale, for an overflow in either pass. Call
        it after the second backward, before the scaler unscales; ``second_step`` itself
        does this when it is given the scaler."""
        if not self.is_perturbed:
            raise RuntimeError("fold_first_pass_check() belongs between first_step and second_step")
        for b in self._buckets:
            b.refresh_grads()
        mark_nonfinite_(self._buckets, self._first_finite)

    @step_entry
    @torch.no_grad()
    def restore_weights(self) -> None:
        """Copy the saved ``w`` back into every perturbed parameter (exact, idempotent)."""
        if self._backup is None:
            return
        for b, saved in zip(self._buckets, self._backup):
            torch._foreach_copy_(b.params, saved)
        self._backup = None

    @step_entry
    def abandon_step(self) -> None:
        """Give up a step after ``first_step``: restore ``w`` exactly, forget the pass's
        transient state and gradients; the optimizer state is as before the step."""
        self.restore_weights()
        self._clear_transient()
        self.zero_grad()

    # -- pieces that the rest of the family overrides -------------------------------

    def _before_first_step(self) -> None:
        """Hook: adjust per-group settings (GSAM's ρ schedule) before the ascent."""

    def _after_first_gradient(self, buckets: list[Bucket], grad_norm: Tensor) -> None:
        """Hook: the clean gradient ``g`` is in ``bucket.grads`` (keep what you need)."""

    def _perturb(self, bucket: Bucket, weighted: list[Tensor], scale: Tensor) -> None:
        """``w ← w + ε`` with ``ε = scale · T ⊙ (T ⊙ g)``; ``weighted`` is ``T ⊙ g``.

        One fused in-place ``addcmul`` per tensor: no ε is ever materialised.
        """
        if bucket.scaled:
            factors = adaptive_scale(bucket)
            torch._foreach_mul_(factors, scale)
        else:
            factors = [scale] * len(weighted)
        torch._foreach_addcmul_(bucket.params, weighted, factors)

    def _update_direction(self, buckets: list[Bucket]) -> None:
        """Hook: turn the surrogate gradient ``g_s`` in ``.grad`` into the method's update
        direction ``d``, in place (SAM: ``d = g_s``; GSAM projects, LookSAM keeps ``g_v``)."""

    def _clean_gradient_copy(self, buckets: list[Bucket]) -> list[list[Tensor]]:
        """The clean gradient ``g`` now in ``.grad``, copied into reusable buffers (GSAM
        and LookSAM keep it past the second pass)."""
        copies = self._buffers.get("g", buckets)
        for copy, b in zip(copies, buckets):
            torch._foreach_copy_(copy, b.grads)
        return copies

    def _renormalize(self, buckets: list[Bucket], clean_norm: Tensor) -> None:
        """StableSAM: ``d ← γ·d`` with ``γ = ‖T g‖/‖T d‖`` (capped at 1 with
        ``stable_cap``); both norms over ``buckets``, ``γ`` applied to every gradient the
        base step will see. ``γ = 1`` when ``d = 0``."""
        direction_norm = global_norm(
            [weighted(b, b.grads) for b in buckets], self._reference_device(), shards_of(buckets)
        )
        gamma = torch.where(direction_norm > 0, clean_norm / direction_norm, 1.0)
        if self.stable_cap:
            gamma = torch.clamp(gamma, max=1.0)
        scale_gradients_(self.param_groups, gamma)

    def _clip(self) -> None:
        """Clip every gradient the base step will apply (ESAM's unperturbed tensors too)."""
        if self.max_grad_norm is not None:
            with torch.no_grad():
                clip_gradients_(self.param_groups, self.max_grad_norm, self._reference_device())
