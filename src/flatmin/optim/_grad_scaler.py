"""Mixed precision in the SAM family: one ``torch.amp.GradScaler`` over two passes.

Under ``torch.autocast`` nothing changes. With a GradScaler, both losses are scaled and
the scaler is given to **both** ``first_step`` and ``second_step`` (or to ``step``, whose
closure scales its loss):

- ``first_step`` divides the scale out of ε. With ``normalize=True`` it cancels in
  ``g/‖g‖`` anyway; USAM's ``ε = ρ·T²g`` taken from a scaled gradient would be as many
  times too large as the scale (65,536 at the start).
- ``second_step`` unscales once (``GradScaler.unscale_`` records what ``update()`` needs
  and refuses a second unscale), and skips the step, weights and optimizer state
  untouched, when either pass gave a non-finite gradient.

A caller whose own scaler unscales and steps after the second pass (transformers'
Trainer) gives the scaler to ``first_step`` only and calls ``fold_first_pass_check``.
A scaler given to ``second_step`` but not to ``first_step`` is refused
(:func:`check_same_scaler`). On a CPU the device type is ``"cpu"`` (for the scaler and
for ``torch.autocast``, with ``dtype=torch.bfloat16``); ``"cuda"`` there disables both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flatmin.optim._buckets import global_norm, make_buckets, shards_of


def scale_of(grad_scaler: Any, device: torch.device) -> Tensor:
    """The GradScaler's current scale as a tensor (1 without a scaler), without syncing."""
    scale = getattr(grad_scaler, "_scale", None) if grad_scaler is not None else None
    if scale is None:
        return torch.ones((), device=device)
    return scale.to(device, torch.float32)


def check_same_scaler(first: Any, second: Any) -> None:
    """Raise unless ``second_step``'s scaler (``second``) is ``None`` or the one that
    ``first_step`` got (``first``): ε was taken from a gradient of that scale."""
    if second is None or second is first:
        return
    got = "no grad_scaler" if first is None else "a different grad_scaler"
    raise ValueError(
        f"second_step got a grad_scaler but first_step got {got}: ε was computed from a "
        "gradient of another scale. Pass the same scaler to both passes (or to step()); "
        "the weights are still at w + ε: call second_step again with the first pass's "
        "scaler, or abandon_step() to restore w"
    )


def unscale_and_check(grad_scaler: Any, optimizer: Any, device: torch.device) -> bool:
    """Unscale ``optimizer``'s gradients once and say whether they are all finite.

    ``unscale_`` records what ``grad_scaler.update()`` needs (and refuses a second
    unscale); the step is then skipped, as ``GradScaler.step`` would, when any gradient
    is not finite. The verdict is the global norm's, the same on every shard's rank."""
    grad_scaler.unscale_(optimizer)
    grads = make_buckets(optimizer.param_groups, adaptive_rule=False)
    norm = global_norm([b.grads for b in grads], device, shards_of(grads))
    return bool(torch.isfinite(norm))
