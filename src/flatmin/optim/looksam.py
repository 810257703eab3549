r"""LookSAM: SAM's second pass only every k-th step (Liu et al., CVPR 2022, "Towards
Efficient and Scalable Sharpness-Aware Minimization", arXiv:2203.02714).

The surrogate gradient ``g_s`` differs from the clean gradient ``g`` mostly by a
component orthogonal to ``g`` that changes slowly, so LookSAM computes it on every k-th
step and reuses it in between:

.. math::

    t \bmod k = 0:& \quad g_s = ∇L(w+ε),\; g_v = g_s − \frac{⟨g, g_s⟩}{\lVert g\rVert^2}\, g,
    \; \text{update with } g_s \\
    \text{otherwise}:& \quad g = ∇L(w),\; \text{update with }
    g + α \frac{\lVert g\rVert}{\lVert g_v\rVert}\, g_v

So only one step in k pays for a second forward/backward; the ideal throughput is
``1/(1 + 1/k)`` of the base optimizer's (83 % for k = 5).

Driving it: ``step(closure)`` calls the closure twice on full steps and **once** on
reuse steps. In an explicit loop, :attr:`~flatmin.LookSAM.is_reuse_step` says before the step whether it
is a reuse step, and ``first_step`` on a reuse step performs the whole update (it
applies the base optimizer and leaves the weights unperturbed), so
:attr:`~flatmin.SAM.is_perturbed` afterwards says whether a second pass is needed:

.. test: setup=model

::

    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, lr=0.1)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)          # a reuse step ends here
    if opt.is_perturbed:                    # a full step: the second pass at w + ε
        with running_stats_frozen(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

The step counter, ``g_v`` and ``‖g_v‖`` are LookSAM's own state: ``state_dict()`` keeps
``g_v`` of parameter ``i`` in ``["state"][i]["g_v"]`` and ``steps_done`` and ``g_v_norm``
in every param group, so a resumed run reuses exactly the direction the interrupted one
would have. The layout does not depend on the history: before the first full step every
``g_v`` is zeros and ``g_v_norm`` is 0, so a fresh optimizer's state dict is a complete
template for ``torch.distributed.checkpoint``, which loads into one in place. A ``g_v``
from a step with a non-finite gradient (e.g. a GradScaler overflow) is not kept: the
previous one stays.

With ``stable=True`` (StableSAM, Tan et al., 2024) every step's update direction ``d``
— ``g_s`` on full steps, ``g + α(‖g‖/‖g_v‖)g_v`` on reuse steps — is renormalised to the
clean gradient's norm, ``d ← (‖T g‖/‖T d‖)·d``, so each update has the norm of that step's
``g`` as StableSAM asks of every update. ``g_v`` is kept from the unrescaled ``g_s`` (the
reuse direction does not depend on ``g_v``'s scale).

With per-process ε under data parallelism (:func:`flatmin.distributed.sam_step`)
each process computes its own ``g_v,r`` from its own ``g_r`` and ``g_s,r``; the kept
``g_v`` is their mean (:attr:`~flatmin.SAM.replica_mean`), so every process
holds the same state and rank 0's checkpoint resumes all of them. A reuse step's
direction ``g_r + α(‖g_r‖/‖g_v‖)g_v`` is then averaged like any final direction.

Defaults: ``k = 5`` and ``alpha = 0.7`` are the paper's; ρ has no CIFAR default in the
paper, so SAM's 0.05 is used. They were tuned for large models, where ``g_v`` changes
slowly; on small models check that premise first (``benchmarks/looksam_direction.py``
measures how stable ``g_v`` is; ``benchmarks/RESULTS.md`` has what it found and how
α = 0.7 trained there). Under bf16 autocast a small model's ε is mostly below the
weights' bf16 resolution, so ``g_s ≈ g`` and ``g_v`` is little more than rounding noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flatmin.optim._base import OptimizerFactory
from flatmin.optim._buckets import (
    Bucket,
    global_dot,
    global_norm,
    local_part,
    make_buckets,
    shards_of,
    weighted,
)
from flatmin.optim._checks import check_int, check_real
from flatmin.optim._entry import step_entry
from flatmin.optim.sam import SAM


class LookSAM(SAM):
    """LookSAM wrapping any ``torch.optim.Optimizer``.

    Args:
        params: parameters or param groups.
        base_optimizer: the optimizer to wrap (a class such as ``torch.optim.SGD``, or a
            callable that builds one; see :class:`~flatmin.optim.sam.SAM`).
        rho: radius ρ of the full steps' perturbation.
        k: a full SAM step every ``k`` steps (``k = 1`` is SAM, apart from ``g_v``).
        alpha: weight α ≥ 0 of the reused direction on the other steps.
        **kwargs: SAM options and the base optimizer's keyword arguments.

    Example, with a SAM closure (forward + backward, returns the loss):

    .. test: setup=sam

    ::

        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, lr=0.1)
        loss = opt.step(closure, model=model)  # the closure runs twice every k-th step
    """

    uses_clean_gradient = True  # reuse steps update with g
    _state_keys = ("g_v",)
    _group_keys = ("steps_done", "g_v_norm")

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: OptimizerFactory,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        k = check_int("k", k, minimum=1, hint="LookSAM's default is 5")
        alpha = check_real("alpha", alpha, minimum=0.0, hint="LookSAM's default is 0.7")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.k = k
        self.alpha = alpha
        self.steps_done = 0
        self._g_v: dict[Tensor, Tensor] = {}
        self._g_v_norm: Tensor | None = None

    @property
    def is_reuse_step(self) -> bool:
        """True when the coming step reuses ``g_v`` (one forward/backward pass)."""
        return self.steps_done % self.k != 0 and self._g_v_norm is not None

    # -- driving a step ------------------------------------------------------------------

    @step_entry
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """On a full step: move to ``w + ε`` as SAM does. On a reuse step: update ``w``
        with ``g + α·(‖g‖/‖g_v‖)·g_v`` and finish the step (no second pass follows)."""
        if self.is_perturbed or not self.is_reuse_step:
            super().first_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
            return
        with torch.no_grad():
            buckets = make_buckets(self.param_groups)
            if not buckets:
                raise RuntimeError(
                    "first_step() found no gradients: call loss.backward() before first_step()"
                )
            device = self._reference_device()
            shards = shards_of(buckets)
            grad_norm = global_norm([b.grads for b in buckets], device, shards)
            clean_norm = grad_norm
            if self.stable and any(b.scaled for b in buckets):
                clean_norm = global_norm([weighted(b, b.grads) for b in buckets], device, shards)
            scale = torch.where(self._g_v_norm > 0, self.alpha * grad_norm / self._g_v_norm, 0.0)
            for b in buckets:
                pairs = [
                    (g, local_part(self._g_v[p]))
                    for p, g in zip(b.owners, b.grads)
                    if p in self._g_v
                ]
                if pairs:
                    grads, reused = map(list, zip(*pairs))
                    factor = scale.to(b.device, grads[0].dtype)
                    torch._foreach_addcmul_(grads, reused, [factor] * len(grads))
        self._apply_update(buckets, torch.isfinite(grad_norm), grad_scaler, clean_norm)
        self.steps_done += 1
        if zero_grad:
            self.zero_grad()

    @step_entry
    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        super().second_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
        self.steps_done += 1

    # -- hooks of the SAM engine ------------------------------------------------------

    def _clear_transient(self) -> None:
        super()._clear_transient()
        self._clean_grads: list[list[Tensor]] | None = None
        self._clean_sq_norm: Tensor | None = None

    def _after_first_gradient(self, buckets: list[Bucket], grad_norm: Tensor) -> None:
        self._clean_grads = self._clean_gradient_copy(buckets)
        if any(b.scaled for b in buckets):  # ASAM's grad_norm is the |w|-weighted one
            grad_norm = global_norm(self._clean_grads, self._reference_device(), shards_of(buckets))
        self._clean_sq_norm = grad_norm.square()

    def _update_direction(self, buckets: list[Bucket]) -> None:
        """Keep ``g_v = g_s − (⟨g,g_s⟩/‖g‖²)·g``; the update direction stays ``g_s``."""
        device = self._reference_device()
        clean = self._clean_grads
        shards = shards_of(buckets)
        inner = global_dot(clean, [b.grads for b in buckets], device, shards)
        coef = torch.where(self._clean_sq_norm > 0, inner / self._clean_sq_norm, 0.0)
        for b, g in zip(buckets, clean):  # g becomes g_v in place
            torch._foreach_mul_(g, (-coef).to(b.device, g[0].dtype))
            torch._foreach_add_(g, b.grads)
        if self.replica_mean is not None:  # per-process ε: every replica keeps the mean g_v
            self.replica_mean([t for g_v in clean for t in g_v])
        norm = global_norm(clean, device, shards)
        keep = torch.isfinite(norm)
        # The kept g_v ← new where finite, else unchanged (zeros if there was none), in
        # place: a rejected g_v is zeroed first so that lerp's weight 0 cannot mix in NaN.
        for b, g_v, flat in zip(buckets, clean, self._buffers.flat("g")):
            flat.masked_fill_(~keep.to(b.device), 0.0)
            kept = [self._g_v_slot(p, new) for p, new in zip(b.owners, g_v)]
            torch._foreach_lerp_(kept, g_v, keep.to(b.device, g_v[0].dtype))
        old_norm = self._g_v_norm if self._g_v_norm is not None else torch.zeros_like(norm)
        self._g_v_norm = torch.where(keep, norm, old_norm)
        self._clean_grads = None

    def _g_v_slot(self, p: Tensor, like: Tensor) -> Tensor:
        """The local part of the tensor that keeps ``p``'s ``g_v`` (zeros until the first
        finite one); ``like`` is the local part of ``p``'s gradient. The kept tensor is
        shaped like ``p``: for a sharded (DTensor) parameter a DTensor sharded like it, so
        that checkpoints of it stay sharded."""
        slot = self._g_v.get(p)
        if slot is None or local_part(slot).shape != like.shape or slot.dtype != like.dtype:
            slot = self._g_v[p] = torch.zeros_like(p, dtype=like.dtype)
        return local_part(slot)

    # -- checkpointing ------------------------------------------------------------------

    def _state_extras(self) -> dict[Tensor, dict[str, Tensor]]:
        """``g_v`` of every parameter: zeros shaped (and sharded) like it where none is
        kept yet."""
        kept = self._g_v
        return {
            p: {"g_v": kept[p] if p in kept else torch.zeros_like(p.detach())}
            for p in self._params()
        }

    def _group_extras(self) -> dict[str, Any]:
        norm = self._g_v_norm
        if norm is None:  # no full step yet: 0, as a tensor like the norms to come
            first = self._params()[0]
            dtype = torch.promote_types(first.dtype, torch.float32)
            norm = torch.zeros((), dtype=dtype, device=first.device)
        return {"steps_done": self.steps_done, "g_v_norm": norm}

    def _load_method_state(
        self, per_param: dict[Tensor, dict[str, Tensor]], values: dict[str, Any]
    ) -> None:
        self.steps_done = int(values["steps_done"])
        # Copies: the kept g_v is updated in place, the caller's state dict must not be.
        self._g_v = {p: extras["g_v"].clone() for p, extras in per_param.items()}
        norm = values["g_v_norm"]
        self._g_v_norm = None if norm is None else norm.to(self._reference_device())
