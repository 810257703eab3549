"""``step(closure)`` of the SAM family: both passes driven from one closure.

A mixin of :class:`~flatmin.optim.sam.SAM` (before ``torch.optim.Optimizer``): it calls
the engine's passes (``first_step``, ``second_step``, ``abandon_step``) in order, runs
the second pass with the model's BatchNorm statistics frozen, refuses gradients
accumulated outside the closure (:mod:`flatmin.optim._accumulation`) and leaves
``.grad`` as ``None``, which is what frameworks that call ``optimizer.step(closure)``
(Lightning, accelerate) need to get a correct SAM step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from flatmin.optim._accumulation import (
    GradientsAtEntry,
    accumulation_error,
    framework_accumulation,
)
from flatmin.optim._entry import no_closure_error, step_entry
from flatmin.optim.bn import running_stats_frozen


class ClosureStep:
    """``step``, ``run_first_pass`` and ``run_second_pass`` of the SAM family."""

    model: nn.Module | None

    @step_entry
    def step(
        self,
        closure: Callable[..., Tensor] | None = None,
        *,
        model: nn.Module | None = None,
        grad_scaler: Any = None,
    ) -> Tensor | None:
        """One full step. ``closure`` runs forward and backward and returns the loss.

        It is called at ``w`` (:meth:`run_first_pass`) and at ``w + ε``
        (:meth:`run_second_pass`; not on a step that :meth:`first_step` completes by
        itself, as LookSAM's reuse steps). BatchNorm statistics of ``model`` (default:
        the constructor's ``model``) are kept to the first pass. With a ``grad_scaler``
        the closure scales its own loss (``grad_scaler.scale(loss).backward()``); the
        step unscales once and skips a non-finite step; call ``grad_scaler.update()``
        afterwards. Returns the first-pass loss and leaves ``.grad`` as ``None``.

        Gradients accumulated outside the closure (a ``backward`` before this call, or
        accelerate's ``gradient_accumulation_steps > 1``) are refused with a
        ``ValueError`` before anything changes: accumulate inside the closure. If the
        second pass raises, the weights are restored before the exception propagates.
        """
        name = type(self).__name__
        if closure is None:
            raise no_closure_error(name)
        source = framework_accumulation()
        if source is not None:
            raise accumulation_error(name, source)
        entry = GradientsAtEntry(self._params())
        with torch.enable_grad():
            loss = self.run_first_pass(closure, grad_scaler=grad_scaler)
        entry.check(name)
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        if self.is_perturbed:
            try:
                with torch.enable_grad(), _frozen_or_not(self.model if model is None else model):
                    self.run_second_pass(closure, grad_scaler=grad_scaler)
            except BaseException:
                self.abandon_step()
                raise
            self.second_step(grad_scaler=grad_scaler)
        self.zero_grad()
        return loss

    @step_entry
    def run_first_pass(
        self,
        closure: Callable[..., Tensor],
        *,
        skip_unused_gradients: bool = True,
        grad_scaler: Any = None,
    ) -> Tensor:
        """The first pass of :meth:`step` at ``w``: ``closure()``, which leaves ``g`` in
        ``.grad``; returns the loss to report. ``skip_unused_gradients=False`` when the
        backward must produce every gradient (a synchronizing DDP backward); only ESAM
        skips any. ``grad_scaler`` is for members that call backward themselves (ESAM);
        a SAM-style closure scales its own loss."""
        del skip_unused_gradients, grad_scaler
        return closure()

    @step_entry
    def run_second_pass(self, closure: Callable[..., Tensor], *, grad_scaler: Any = None) -> None:
        """The second pass of :meth:`step` at ``w + ε``: ``closure()`` leaves ``g_s`` in
        ``.grad``. Call it with BatchNorm statistics frozen, after :meth:`first_step`."""
        del grad_scaler
        closure()


def _frozen_or_not(model: nn.Module | None) -> Any:
    """BatchNorm statistics frozen for the second pass when a model is given."""
    return running_stats_frozen(model) if model is not None else nullcontext()
