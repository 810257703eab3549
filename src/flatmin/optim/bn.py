"""Keep BatchNorm running statistics to the first pass of a two-pass step.

SAM's second forward pass runs at the perturbed weights ``w + ε``; the statistics it
sees belong to a model that is never kept, so the official SAM code updates running
statistics from the first pass only (Foret et al., 2021).

The popular way to do this sets ``momentum = 0`` for the second pass. That leaves the
running mean and variance alone, but PyTorch still increments ``num_batches_tracked``,
and for ``momentum=None`` (cumulative averaging) the next first pass then uses a wrong
averaging factor ``1 / num_batches_tracked``. Here BatchNorm layers are switched to
``track_running_stats = False`` instead: they normalise with the batch statistics
exactly as in training mode, and neither the running statistics nor
``num_batches_tracked`` move. Instance-norm layers that track statistics have no
counter and ignore that flag in training mode, so for them the momentum is set to 0.
Whatever is changed is saved once and restored exactly (``None`` included), so both
functions are safe to call twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

_SAVED = "_flatmin_saved_stats_setting"


def _tracking_modules(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if isinstance(module, (_BatchNorm, _InstanceNorm)) and module.running_mean is not None:
            yield module


def disable_running_stats(model: nn.Module) -> None:
    """Stop every norm layer of ``model`` from updating its running statistics.

    Idempotent: a second call keeps the setting saved by the first.
    """
    for module in _tracking_modules(model):
        if hasattr(module, _SAVED):
            continue
        if isinstance(module, _BatchNorm):
            setattr(module, _SAVED, ("track_running_stats", module.track_running_stats))
            module.track_running_stats = False
        else:
            setattr(module, _SAVED, ("momentum", module.momentum))
            module.momentum = 0.0


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` exactly; a no-op for layers not disabled."""
    for module in _tracking_modules(model):
        saved = module.__dict__.pop(_SAVED, None)
        if saved is not None:
            attribute, value = saved
            setattr(module, attribute, value)


@contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model``'s norm layers leave their running statistics alone."""
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
