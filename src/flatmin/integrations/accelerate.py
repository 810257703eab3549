"""accelerate: one SAM-family step on the objects ``Accelerator.prepare`` returned.

.. test: skip="a part of examples/accelerate_sam.py, which tests/examples runs"

The recipe (each part tested against the README's own loops)::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for x, y in loader:
        def closure():
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss
        opt.zero_grad()
        loss = sam_step(accelerator, opt, closure)

* ``model=`` goes to the optimizer's constructor (``AcceleratedOptimizer.step`` takes no
  keyword arguments), so BatchNorm statistics move in the first pass only.
* Gradient accumulation: not ``accelerator.accumulate()`` (it skips ``optimizer.step``,
  and so the closure, on all micro-batches but the last; flatmin refuses
  ``gradient_accumulation_steps > 1``), but every micro-batch inside the one closure,
  each loss divided by their number, the non-final ones under
  ``accelerator.no_sync(model)``.
* Mixed precision: ``accelerator.backward`` scales the loss when accelerate holds a
  GradScaler (fp16 on a GPU); :func:`sam_step` then unscales once per step, skips a
  non-finite step with weights and optimizer state untouched and updates the scaler.
  bf16 needs no scaler. On a CPU accelerate runs ``mixed_precision="fp16"`` in float32.
* Checkpoints: ``accelerator.save_state`` / ``load_state`` carry the optimizer's state
  (torch's layout); register SAF and MESA with ``accelerator.register_for_checkpointing``.
* Several processes: this gives SAM with the globally averaged first-pass gradient;
  for per-process ε (the SAM paper's m-sharpness) use :func:`flatmin.distributed.sam_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor, nn

from flatmin.optim import SAM


def sam_step(
    accelerator: Accelerator,
    optimizer: Any,
    closure: Callable[..., Tensor],
    *,
    model: nn.Module | None = None,
) -> Tensor:
    """``optimizer.step(closure)`` for a prepared SAM-family optimizer, with accelerate's
    GradScaler if it has one; returns the first-pass loss.

    Args:
        accelerator: the ``Accelerator`` that prepared the optimizer.
        optimizer: the prepared optimizer (or the SAM-family optimizer itself).
        closure: runs forward and ``accelerator.backward(loss)``, returns the loss.
        model: overrides the optimizer's ``model=`` for this step.
    """
    sam = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    if not isinstance(sam, SAM):
        raise TypeError(
            f"sam_step needs a SAM-family optimizer (prepared or not), got {type(sam).__name__}"
        )
    scaler = accelerator.scaler
    loss = sam.step(closure, model=model, grad_scaler=scaler)
    if scaler is not None:
        scaler.update()
    return loss


__all__ = ["sam_step"]
