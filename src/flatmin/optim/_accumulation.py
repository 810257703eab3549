"""Refuse gradient accumulation that a closure step cannot see.

``step(closure)`` runs the closure at ``w`` and again at ``w + ε``. Frameworks that
accumulate gradients over micro-batches call backward on the earlier micro-batches
*outside* the closure (Lightning's ``accumulate_grad_batches``), or never call their
closures at all (accelerate's ``accumulate()`` skips ``optimizer.step`` until the last
micro-batch). Either way the second pass would see the last micro-batch only, so the
update would be silently wrong. Two checks catch this before anything moves:

* :class:`GradientsAtEntry`: gradients that were already in ``.grad`` when ``step``
  began and that the first closure call added onto (the same tensors are still there,
  not zeroed and replaced) — and were not all zero. The check is free when ``.grad`` is
  ``None`` at entry, which ``step`` itself ensures by leaving it ``None`` on exit.
* :func:`framework_accumulation`: accelerate's gradient-accumulation setting, read from
  its process-wide state when accelerate has been imported (flatmin never imports it).

The correct recipe runs every micro-batch inside one closure (each loss divided by their
number), so ``ε`` and the update both come from all of them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import Tensor

RECIPE = (
    "Accumulate inside one closure instead: run every micro-batch's forward and backward "
    "(each loss divided by their number) in the closure and call step(closure) once per "
    "optimizer step, so that both passes see all micro-batches (Lightning: manual "
    "optimization; accelerate: no accumulate() and gradient_accumulation_steps=1). See the "
    "README section 'Use with your framework'."
)


def accumulation_error(optimizer_name: str, source: str) -> ValueError:
    return ValueError(
        f"{optimizer_name}.step(closure) cannot use gradient accumulation done outside its "
        f"closure ({source}): the perturbation would come from the accumulated gradient but "
        f"the second pass from the last micro-batch only, a wrong update. {RECIPE}"
    )


class GradientsAtEntry:
    """The gradients present when ``step(closure)`` began, to check after the first pass."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.grads = {p: p.grad for p in params if p.grad is not None}
        # Whether any of them is non-zero, as a tensor: the host only waits for it when
        # the first pass really added onto them (one flag per device, no sync here).
        self.nonzero = [
            torch.stack(torch._foreach_norm(group)).amax() > 0
            for group in _by_device(self.grads.values())
        ]

    def check(self, optimizer_name: str) -> None:
        """Raise if the first pass accumulated onto non-zero gradients from before."""
        if not any(p.grad is g for p, g in self.grads.items()):
            return
        if any(bool(flag) for flag in self.nonzero):
            raise accumulation_error(
                optimizer_name,
                "gradients from a backward() before step(closure), e.g. Lightning's "
                "accumulate_grad_batches, or a step() without closure after "
                "manual_backward()",
            )


def _by_device(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t.detach())
    return list(groups.values())


def framework_accumulation() -> str | None:
    """A description of the framework accumulation in effect that a closure step cannot
    see, or None. Only accelerate's is visible this way; it is read without importing."""
    state = sys.modules.get("accelerate.state")
    gradient_state = getattr(state, "GradientState", None)
    shared = getattr(gradient_state, "_shared_state", None)
    if not isinstance(shared, dict):
        return None
    steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
    if isinstance(steps, int) and steps > 1:
        return f"accelerate's gradient_accumulation_steps={steps}"
    return None
