r"""SAM, ASAM, USAM and StableSAM: the two-pass engine of the SAM family.

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
  see :func:`flatmin.optim._buckets.is_adaptive_weight`).
* ``adaptive="all"`` — the popular PyTorch port: ``T_w = |w| + η`` on every parameter,
  η = 0 by default; its recommended ρ is about 2.0.

StableSAM (Tan et al., 2024, arXiv:2401.07250), ``stable=True``: the update direction
``d`` (``g_s`` for SAM; each member's own direction for GSAM and LookSAM) is rescaled so
that its norm is the clean gradient's,

.. math::

    d ← γ\,d, \qquad γ = \frac{\lVert T g\rVert_2}{\lVert T d\rVert_2},

capped at 1 with ``stable_cap=True``, ``T`` the adaptive scaling (1 without it). Both
norms use the scaling ``T`` of the weights ``w`` that the update is applied to. (The authors' code takes
``‖T g_s‖`` with ``T`` of ``w + ε``, before restoring; that mixes two metrics: with a
constant gradient, ``g_s = g``, it still rescales the update by ``‖T(w) g‖/‖T(w+ε) g‖``,
whereas here ``γ = 1``.) The authors use it on top of USAM (``normalize=False``) as well
as SAM and ASAM.

Two ways to drive a step::

    loss = opt.step(closure, model=model)      # closure: forward + backward, returns loss

    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)             # w ← w + ε (a copy of w is kept)
    with running_stats_frozen(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)            # w ← saved copy, then the base step

Mixed precision: under ``torch.autocast`` nothing changes. With a
``torch.amp.GradScaler`` scale both losses and hand the scaler to ``second_step``; it
unscales once, skips the step when either pass produced a non-finite gradient, and
restores the weights, so weights and optimizer state are left untouched::

    scaler.scale(loss_fn(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_fn(model(x), y)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()

Gradient accumulation: call ``backward`` on every micro-batch (losses divided by their
number) before ``first_step``, and again on every micro-batch before ``second_step``;
the perturbation is computed once from the accumulated gradient.
``max_grad_norm`` clips the final (surrogate) gradient, after unscaling, before the base
optimizer sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin._checks import check_choice, check_real
from flatmin.optim._buckets import Bucket, global_norm, make_buckets
from flatmin.optim.bn import running_stats_frozen

ADAPTIVE_FORMS = (None, "weights", "all")
DEFAULT_ETA = {"weights": 0.01, "all": 0.0}


class SAM(Optimizer):
    """Sharpness-Aware Minimization wrapping any ``torch.optim.Optimizer`` class.

    Args:
        params: parameters or param groups (named parameters are accepted and let the
            official ASAM rule tell weights from biases by name).
        base_optimizer: the optimizer *class* to wrap, e.g. ``torch.optim.SGD``.
        rho: neighbourhood radius ρ ≥ 0 (per group allowed).
        adaptive: ``None`` (SAM), ``"weights"`` (official ASAM) or ``"all"`` (the
            popular port's form); per group allowed.
        stable: StableSAM's renormalisation of the update direction.
        normalize: ``False`` gives unnormalised SAM (USAM): ``ε = ρ·T²g``.
        eta: ASAM's η in ``T_w = |w| + η`` (per group allowed); ``None`` takes the
            form's default, 0.01 for ``"weights"`` and 0 for ``"all"``. Refused without
            an adaptive form, where it would have no effect.
        stable_cap: cap StableSAM's factor at 1 (needs ``stable=True``).
        max_grad_norm: clip the final gradient's global L2 norm to this value.
        skip_nonfinite: without a GradScaler, skip the step when the first-pass gradient
            is not finite (costs one host synchronisation per step). With a GradScaler
            the skip is always on and free.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, …).

    Attributes:
        replica_mean: ``None``, or a collective that replaces a list of tensors in place
            by their mean over data-parallel replicas. When set, every gradient the base
            step will apply is passed to it at the start of the update — after the
            method's own transformation (StableSAM's ``γ``, GSAM's projection), before
            clipping and the base step — so per-process directions become one shared
            direction. :func:`flatmin.distributed.sam.sam_step` sets it for the duration
            of a step with per-process ε; leave it ``None`` otherwise.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: str | None = None,
        stable: bool = False,
        *,
        normalize: bool = True,
        eta: float | None = None,
        stable_cap: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD (its "
                f"keyword arguments go to SAM), got {base_optimizer!r}"
            )
        _check_settings(dict(rho=rho, adaptive=adaptive, eta=eta))
        if max_grad_norm is not None:
            check_real("max_grad_norm", max_grad_norm, minimum=0.0, exclusive_minimum=True)
        if stable_cap and not stable:
            raise ValueError(
                "stable_cap=True caps StableSAM's factor, which only stable=True applies: "
                "pass stable=True as well, or leave stable_cap off"
            )
        params = list(params)
        if not params:
            raise ValueError(
                "SAM got an empty parameter list: pass model.parameters() (or a list of "
                "param groups) of a model that has parameters"
            )
        self.normalize = normalize
        self.stable = stable
        self.stable_cap = stable_cap
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.replica_mean: Callable[[list[Tensor]], None] | None = None
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._link_base()
        self.defaults.update(self.base_optimizer.defaults)
        if eta is not None and not any(g["adaptive"] for g in self.param_groups):
            raise ValueError(
                f"eta={eta!r} is ASAM's η in T_w = |w| + η and has no effect without an "
                "adaptive form: pass adaptive='weights' or 'all', or leave eta out"
            )
        self._clear_transient()

    # -- plumbing shared with the base optimizer -----------------------------------

    def _link_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _clear_transient(self) -> None:
        self._buckets: list[Bucket] | None = None
        self._backup: list[list[Tensor]] | None = None
        self._grad_norm: Tensor | None = None
        self._first_finite: Tensor | None = None
        self._base_step_pending = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does; its ρ, adaptive form and η are checked first."""
        for key in ("rho", "adaptive", "eta"):
            param_group.setdefault(key, self.defaults[key])
        self._check_group(param_group)
        if param_group["eta"] is None and param_group["adaptive"] is not None:
            param_group["eta"] = DEFAULT_ETA[param_group["adaptive"]]
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            super().add_param_group(param_group)
        else:
            self.base_optimizer.add_param_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise a clear error for a param group whose SAM settings are unusable."""
        _check_settings(group)

    @property
    def is_perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step`` (weights are at ``w + ε``)."""
        return self._backup is not None

    def _reference_device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    # -- the two passes ------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Move to ``w + ε`` computed from the gradient now in ``.grad``; keep ``w``."""
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
        weighted = [self._weighted(b, b.grads) for b in buckets]
        grad_norm = global_norm(weighted, device)
        finite = torch.isfinite(grad_norm)
        self._after_first_gradient(buckets, grad_norm)
        if self.normalize:
            factor = torch.where(finite & (grad_norm > 0), 1.0 / grad_norm, 0.0)
        else:
            factor = torch.where(finite, 1.0, 0.0).to(grad_norm.dtype)
            factor = factor / _scale_of(grad_scaler, device)
        self._backup = self._reusable_buffers("w", buckets)
        for b, saved, wg in zip(buckets, self._backup, weighted):
            torch._foreach_copy_(saved, b.params)
            scale = (factor * b.group["rho"]).to(b.device, b.params[0].dtype)
            self._perturb(b, wg, scale)
        self._buckets = buckets
        self._grad_norm = grad_norm
        self._first_finite = finite
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Restore ``w`` exactly and apply the base optimizer with the surrogate gradient."""
        if not self.is_perturbed:
            raise RuntimeError("second_step() needs a first_step() before it")
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
            self._mark_nonfinite(buckets, finite)  # before averaging: a NaN reaches every replica
        if self.replica_mean is not None:
            self.replica_mean(
                [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            )
        if grad_scaler is not None:
            grad_scaler.unscale_(self)
            self._clip()
            self._base_step_pending = True
            try:
                grad_scaler.step(self)
            finally:
                self._base_step_pending = False
        elif not self.skip_nonfinite or bool(finite):
            self._clip()
            self._base_step_pending = True
            try:
                self.step()
            finally:
                self._base_step_pending = False

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Copy the saved ``w`` back into every perturbed parameter (exact, idempotent)."""
        if self._backup is None:
            return
        for b, saved in zip(self._buckets, self._backup):
            torch._foreach_copy_(b.params, saved)
        self._backup = None

    def abandon_step(self) -> None:
        """Give up a step after ``first_step``: restore ``w`` exactly, forget the pass's
        transient state and gradients; the optimizer state is as before the step."""
        self.restore_weights()
        self._clear_transient()
        self.zero_grad()

    def step(
        self, closure: Callable[[], Tensor] | None = None, *, model: nn.Module | None = None
    ) -> Tensor | None:
        """One full SAM step. ``closure`` runs forward and backward and returns the loss.

        It is called twice: at ``w`` and at ``w + ε``. Pass ``model`` to keep its
        BatchNorm statistics to the first pass. Returns the first-pass loss. If the
        second call raises, the weights are restored before the exception propagates.
        """
        if closure is None:
            if self._base_step_pending:
                return self.base_optimizer.step()
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that runs the forward and "
                "backward pass and returns the loss, e.g. opt.step(lambda: "
                "(loss := loss_fn(model(x), y)).backward() or loss); or call "
                "first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        try:
            if model is None:
                closure()
            else:
                with running_stats_frozen(model):
                    closure()
        except BaseException:
            self.abandon_step()
            raise
        self.second_step()
        return loss

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
            factors = self._adaptive_scale(bucket, bucket.params)
            torch._foreach_mul_(factors, scale)
        else:
            factors = [scale] * len(weighted)
        torch._foreach_addcmul_(bucket.params, weighted, factors)

    def _reusable_buffers(self, slot: str, buckets: list[Bucket]) -> list[list[Tensor]]:
        """Buffers shaped like the buckets' parameters for ``slot`` (the copy of ``w``,
        the clean gradient), allocated once and reused while the set of parameters
        with gradients stays the same; never checkpointed. A fresh allocation of this
        size every step costs page faults: on a CPU, cloning ResNet-18's gradient took
        ~12 ms, copying it into a reused buffer ~2 ms. Each bucket's buffers are views of
        one flat tensor (:meth:`_reusable_flat_buffers`), for whole-bucket operations."""
        key = [tuple(id(p) for p in b.params) for b in buckets]
        cache = self.__dict__.setdefault("_buffer_cache", {})
        if slot not in cache or cache[slot][0] != key:
            flats, views = [], []
            for b in buckets:
                sizes = [p.numel() for p in b.params]
                flat = torch.empty(sum(sizes), dtype=b.params[0].dtype, device=b.device)
                flats.append(flat)
                views.append([v.view(p.shape) for v, p in zip(flat.split(sizes), b.params)])
            cache[slot] = (key, views, flats)
        return cache[slot][1]

    def _reusable_flat_buffers(self, slot: str) -> list[Tensor]:
        """The flat tensors behind the last :meth:`_reusable_buffers` of ``slot``, one per
        bucket."""
        return self._buffer_cache[slot][2]

    def _clean_gradient_copy(self, buckets: list[Bucket]) -> list[list[Tensor]]:
        """The clean gradient ``g`` now in ``.grad``, copied into the reusable ``"g"``
        buffers (GSAM and LookSAM keep it past the second pass)."""
        copies = self._reusable_buffers("g", buckets)
        for copy, b in zip(copies, buckets):
            torch._foreach_copy_(copy, b.grads)
        return copies

    def _update_direction(self, buckets: list[Bucket]) -> None:
        """Hook: turn the surrogate gradient ``g_s`` in ``.grad`` into the method's update
        direction ``d``, in place (SAM: ``d = g_s``; GSAM projects, LookSAM keeps ``g_v``)."""

    def _renormalize(self, buckets: list[Bucket], clean_norm: Tensor) -> None:
        """StableSAM: ``d ← γ·d`` with ``γ = ‖T g‖/‖T d‖`` (capped at 1 with
        ``stable_cap``); both norms over ``buckets``, ``γ`` applied to every gradient the
        base step will see. ``γ = 1`` when ``d = 0``."""
        direction_norm = global_norm(
            [self._weighted(b, b.grads) for b in buckets], self._reference_device()
        )
        gamma = torch.where(direction_norm > 0, clean_norm / direction_norm, 1.0)
        if self.stable_cap:
            gamma = torch.clamp(gamma, max=1.0)
        for b in make_buckets(self.param_groups, adaptive_rule=False):
            torch._foreach_mul_(b.grads, gamma.to(b.device, b.grads[0].dtype))

    # -- helpers -----------------------------------------------------------------------

    def _adaptive_scale(self, bucket: Bucket, params: list[Tensor]) -> list[Tensor]:
        """ASAM's ``T_w = |w| + η`` for a bucket of weights (η from its group)."""
        scale = torch._foreach_abs(params)
        eta = bucket.group["eta"]
        if eta:
            torch._foreach_add_(scale, eta)
        return scale

    def _weighted(self, bucket: Bucket, tensors: list[Tensor]) -> list[Tensor]:
        """``T ⊙ t`` for ASAM weights, ``t`` itself otherwise."""
        if not bucket.scaled:
            return tensors
        return torch._foreach_mul(tensors, self._adaptive_scale(bucket, bucket.params))

    def _clip(self) -> None:
        """Clip every gradient the base step will apply (ESAM's unperturbed tensors too)."""
        if self.max_grad_norm is None:
            return
        with torch.no_grad():
            buckets = make_buckets(self.param_groups, adaptive_rule=False)
            norm = global_norm([b.grads for b in buckets], self._reference_device())
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            for b in buckets:
                torch._foreach_mul_(b.grads, coef.to(b.device, b.grads[0].dtype))

    @staticmethod
    def _mark_nonfinite(buckets: list[Bucket], finite: Tensor) -> None:
        """Make a GradScaler see a non-finite first pass: one NaN per device."""
        seen: set[torch.device] = set()
        for b in buckets:
            if b.device not in seen:
                seen.add(b.device)
                poison = torch.where(finite, 1.0, float("nan")).to(b.device, b.grads[0].dtype)
                b.grads[0].mul_(poison)

    # -- checkpointing ------------------------------------------------------------------

    def _method_state(self) -> dict[str, Any]:
        """The method's own persistent state (none for SAM; LookSAM keeps its counter)."""
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        del state

    def state_dict(self) -> dict[str, Any]:
        """``{"base_optimizer": …, "method": …}``: the base optimizer's full state
        (momentum, Adam moments, param groups with ρ) and the method's own state. The
        transient copy of ``w`` is never saved; call it between two steps."""
        if self.is_perturbed:
            raise RuntimeError(
                "state_dict() between first_step() and second_step() would pair perturbed "
                "weights with the optimizer state; call it after second_step()"
            )
        return {"base_optimizer": self.base_optimizer.state_dict(), "method": self._method_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict:
            raise ValueError(
                f"expected a state dict produced by {type(self).__name__}.state_dict(), "
                "with keys 'base_optimizer' and 'method'"
            )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self._link_base()
        self._load_method_state(state_dict.get("method", {}))
        self._clear_transient()


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021), official form: ``T_w = |w| + η`` on weights.

    Defaults ρ = 0.5 and η = 0.01 follow the paper's CIFAR-10 setting (use ρ = 1.0 on
    CIFAR-100). ``adaptive="all"`` gives the popular port's form (η = 0, ρ ≈ 2)::

        opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer],
        rho: float = 0.5,
        adaptive: str = "weights",
        stable: bool = False,
        **kwargs: Any,
    ) -> None:
        if adaptive is None:
            raise ValueError(
                "ASAM needs an adaptive form, 'weights' (official) or 'all'; use SAM for "
                "the non-adaptive one"
            )
        super().__init__(params, base_optimizer, rho, adaptive, stable, **kwargs)


class StableSAM(SAM):
    """StableSAM (Tan et al., 2024): SAM with the surrogate gradient renormalised to ‖g‖.

    Default ρ = 0.05 as for SAM; ``normalize=False`` gives the USAM-based form that the
    authors' code marks as the paper's, ``stable_cap=True`` the optional cap at 1.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, adaptive, stable=True, **kwargs)


def check_adaptive(adaptive: Any) -> None:
    """Raise unless ``adaptive`` is one of :data:`ADAPTIVE_FORMS` (bools are refused)."""
    if isinstance(adaptive, bool):
        raise ValueError(
            f"adaptive={adaptive!r} is not a form: use adaptive='weights' (official ASAM, "
            "|w| + η on weight tensors), adaptive='all' (every parameter) or None (SAM)"
        )
    check_choice("adaptive", adaptive, ADAPTIVE_FORMS)


def check_rho(rho: Any, name: str = "rho") -> float:
    """``rho`` as a float if it is a finite number ≥ 0."""
    return check_real(name, rho, minimum=0.0, hint="e.g. 0.05")


def _check_settings(group: dict[str, Any]) -> None:
    """The SAM settings of a param group (or of the constructor's defaults)."""
    check_rho(group["rho"])
    check_adaptive(group["adaptive"])
    if group["eta"] is not None:
        check_real("eta", group["eta"], minimum=0.0, hint="ASAM's η in T_w = |w| + η")


def _scale_of(grad_scaler: Any, device: torch.device) -> Tensor:
    """The GradScaler's current scale as a tensor (1 without a scaler), without syncing."""
    scale = getattr(grad_scaler, "_scale", None) if grad_scaler is not None else None
    if scale is None:
        return torch.ones((), device=device)
    return scale.to(device, torch.float32)
