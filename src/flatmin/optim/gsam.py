r"""GSAM: surrogate-gap guided SAM (Zhuang et al., ICLR 2022, "Surrogate Gap Minimization
Improves Sharpness-Aware Training", openreview edONMAnhLu-).

SAM minimises the perturbed loss ``L(w+ε)``; GSAM also shrinks the surrogate gap
``L(w+ε) − L(w)`` by descending along the part of the clean gradient that is orthogonal
to the surrogate gradient, which leaves ``L(w+ε)`` unchanged to first order:

.. math::

    g = ∇L(w), \quad g_s = ∇L(w+ε), \quad
    g_⊥ = g − \frac{⟨g, g_s⟩}{\lVert g_s\rVert^2}\, g_s, \quad
    d = g_s − α\, g_⊥

and the base optimizer steps with ``d``. The radius follows the learning rate of each
param group, read when ``first_step`` runs (so any torch LR scheduler drives it):

.. math::

    ρ_t = ρ_{min} + (ρ_{max} − ρ_{min})\,\frac{lr_t − lr_{min}}{lr_{max} − lr_{min}}

``lr_max`` defaults to the group's learning rate when GSAM is built, ``lr_min`` to 0;
when ``lr_max == lr_min`` or ``rho_min == rho`` the radius is the constant ``rho``.
With ``alpha = 0`` and a constant radius GSAM is SAM exactly.

Differences from the authors' PyTorch code (``juntang-zhuang/GSAM``), all deliberate:
the ratio ``(lr_t − lr_min)/(lr_max − lr_min)`` is clamped to [0, 1] so a warm-up or a
mis-set ``lr_max`` never pushes ρ outside ``[rho_min, rho]`` (their
``ProportionScheduler`` extrapolates); no ``1e-12`` is added to the norms (a zero
surrogate gradient gives ``g_⊥ = g`` instead); ``d`` is formed as
``(1 + α c)·g_s − α g`` with ``c = ⟨g,g_s⟩/‖g_s‖²``, the same vector.

With ``stable=True`` (StableSAM, Tan et al., 2024) the final direction is renormalised
to the clean gradient's norm, ``d ← (‖T g‖/‖T d‖)·d``: the rescaling applies to what the
base optimizer receives, as for SAM. (Rescaling ``g_s`` before the projection would leave
``g_⊥`` unchanged and give a direction whose norm is not ``‖g‖``.)

Defaults: ``rho = 0.05`` (ρ_max, SAM's default), ``rho_min = 0`` (ρ proportional to the
learning rate; pass ``rho_min=rho`` for a constant radius), ``alpha = 0.4`` (the value of
the paper's examples; the authors' CIFAR example script uses 0.2 with ASAM).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flatmin.optim._base import OptimizerFactory
from flatmin.optim._buckets import Bucket, global_dot_and_norm, shards_of
from flatmin.optim._checks import check_real
from flatmin.optim._settings import check_rho
from flatmin.optim.sam import SAM

_SCHEDULE_KEYS = ("rho_max", "rho_min", "lr_max", "lr_min")


class GSAM(SAM):
    """Surrogate-gap guided SAM wrapping any ``torch.optim.Optimizer`` class.

    Args:
        params: parameters or param groups.
        base_optimizer: the optimizer to wrap (a class such as ``torch.optim.SGD``, or a
            callable that builds one; see :class:`~flatmin.optim.sam.SAM`).
        rho: ρ_max, the radius at the largest learning rate.
        alpha: weight α ≥ 0 of the orthogonal component ``g_⊥`` subtracted from ``g_s``.
        rho_min: ρ_min, the radius at ``lr_min`` (``rho_min = rho`` keeps ρ constant).
        lr_max: the learning rate at which ρ = ρ_max (default: each group's initial lr).
        lr_min: the learning rate at which ρ = ρ_min.
        **kwargs: SAM options (``adaptive``, ``max_grad_norm``, …) and the base
            optimizer's keyword arguments.

    Schedule settings live in each param group (``rho_max``, ``rho_min``, ``lr_max``,
    ``lr_min``; ``rho`` holds the radius of the latest step), so they are checkpointed
    with the base optimizer and may differ per group. Usage is SAM's; any LR scheduler
    drives ρ too:

    .. test: setup=model

    ::

        opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1,
                   model=model)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader))
        for x, y in loader:
            def closure():
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss
            opt.zero_grad()
            opt.step(closure)
            sched.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: OptimizerFactory,
        rho: float = 0.05,
        alpha: float = 0.4,
        *,
        rho_min: float = 0.0,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        alpha = check_real("alpha", alpha, minimum=0.0, hint="GSAM's default is 0.4")
        _check_schedule(check_rho(rho), rho_min, lr_max, lr_min)
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.alpha = alpha
        self._schedule = dict(rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)
        for group in self.param_groups:
            self._fill_schedule(group)
            self._check_group(group)
        self.defaults.update(self._schedule)

    def _fill_schedule(self, group: dict[str, Any]) -> None:
        group.setdefault("rho_max", group["rho"])
        group.setdefault("rho_min", self._schedule["rho_min"])
        lr_max = self._schedule["lr_max"]
        group.setdefault("lr_max", group["lr"] if lr_max is None else lr_max)
        group.setdefault("lr_min", self._schedule["lr_min"])

    def _check_group(self, group: dict[str, Any]) -> None:
        """SAM's checks, and the schedule's settings once the group has them. ``rho``
        itself is the latest scheduled radius (a tensor if the learning rate is one)."""
        if all(key in group for key in _SCHEDULE_KEYS):
            _check_schedule(group["rho_max"], group["rho_min"], group["lr_max"], group["lr_min"])
        if isinstance(group["rho"], Tensor):
            group = {**group, "rho": 0.0}
        super()._check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "_schedule" not in self.__dict__:  # during construction
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        group.setdefault("rho", group.get("rho_max", self.defaults["rho"]))
        group.setdefault("lr", self.defaults["lr"])
        self._fill_schedule(group)
        super().add_param_group(group)  # checks the group, schedule included

    uses_clean_gradient = True  # the projection on g

    # -- hooks of the SAM engine ------------------------------------------------------

    def _clear_transient(self) -> None:
        super()._clear_transient()
        self._clean_grads: list[list[Tensor]] | None = None

    def _before_first_step(self) -> None:
        """Set each group's ρ from its current learning rate."""
        for group in self.param_groups:
            group["rho"] = scheduled_rho(
                group["lr"], group["rho_max"], group["rho_min"], group["lr_max"], group["lr_min"]
            )

    def _after_first_gradient(self, buckets: list[Bucket], grad_norm: Tensor) -> None:
        self._clean_grads = self._clean_gradient_copy(buckets)

    def _update_direction(self, buckets: list[Bucket]) -> None:
        """``.grad ← g_s − α·g_⊥ = (1 + α c)·g_s − α·g`` with ``c = ⟨g,g_s⟩/‖g_s‖²``."""
        device = self._reference_device()
        surrogate = [b.grads for b in buckets]
        inner, sq_norm = global_dot_and_norm(
            self._clean_grads, surrogate, device, shards_of(buckets)
        ).unbind()
        coef = torch.where(sq_norm > 0, inner / sq_norm, 0.0)
        surrogate_scale = 1.0 + self.alpha * coef
        for b, clean in zip(buckets, self._clean_grads):
            torch._foreach_mul_(b.grads, surrogate_scale.to(b.device, b.grads[0].dtype))
            torch._foreach_add_(b.grads, clean, alpha=-self.alpha)
        self._clean_grads = None


def scheduled_rho(
    lr: float | Tensor, rho_max: float, rho_min: float, lr_max: float, lr_min: float
) -> float | Tensor:
    """GSAM's ``ρ_t = ρ_min + (ρ_max − ρ_min)·(lr − lr_min)/(lr_max − lr_min)``, with the
    ratio clamped to [0, 1]; ``ρ_max`` when ``lr_max == lr_min``."""
    if rho_max == rho_min or lr_max == lr_min:
        return rho_max
    ratio = (lr - lr_min) / (lr_max - lr_min)
    ratio = ratio.clamp(0.0, 1.0) if isinstance(ratio, Tensor) else min(max(ratio, 0.0), 1.0)
    return rho_min + (rho_max - rho_min) * ratio


def _check_schedule(rho_max: Any, rho_min: Any, lr_max: Any, lr_min: Any) -> None:
    """GSAM's radius range ``0 ≤ ρ_min ≤ ρ_max`` and learning-rate range
    ``0 ≤ lr_min ≤ lr_max`` (``lr_max`` may be None: the group's initial lr)."""
    rho_max = check_rho(rho_max, "rho_max")
    rho_min = check_real("rho_min", rho_min, minimum=0.0, hint="GSAM's ρ at lr_min")
    lr_min = check_real("lr_min", lr_min, minimum=0.0)
    if rho_min > rho_max:
        raise ValueError(
            f"rho_min ({rho_min}) must not exceed rho ({rho_max}), the radius at the largest "
            "learning rate; pass rho_min=rho for a constant radius"
        )
    if lr_max is not None and not isinstance(lr_max, Tensor):
        check_real(
            "lr_max",
            lr_max,
            minimum=lr_min,
            hint="leave it None to use each group's initial learning rate",
        )
