"""Measuring never changes the model: snapshot everything a measurement can touch.

Every function in :mod:`flatmin.measure` runs inside :func:`measuring`, which records
each submodule's ``training`` flag, every parameter's value, gradient and
``requires_grad`` flag, and every buffer (BatchNorm running statistics included), puts
the model in the measuring mode, and on exit — normal or by an exception — writes the
saved values back. Values are restored from copies, never recomputed (``w + ε − ε`` is
not ``w`` in floating point).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _ModelSnapshot:
    """Exact copies of a model's mode, parameters, gradients, flags and buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(module, module.training) for module in model.modules()]
        self.params = [
            (p, p.detach().clone(), p.grad, p.requires_grad) for p in _unique(model.parameters())
        ]
        self.buffers = [(b, b.detach().clone()) for b in _unique(model.buffers())]

    @torch.no_grad()
    def restore(self) -> None:
        for module, training in self.modes:
            module.training = training
        for param, value, grad, requires_grad in self.params:
            param.copy_(value)
            param.grad = grad
            param.requires_grad_(requires_grad)
        for buffer, value in self.buffers:
            buffer.copy_(value)


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def set_measuring_mode(model: nn.Module, train_mode_bn: bool = False) -> None:
    """Eval mode everywhere; with ``train_mode_bn`` BatchNorm layers use batch statistics.

    Dropout and every other mode-dependent layer stay in eval mode either way, so a
    measurement is deterministic. BatchNorm in train mode updates its running
    statistics; :func:`measuring` puts them back afterwards.
    """
    model.eval()
    if train_mode_bn:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.train()


@contextmanager
def measuring(model: nn.Module, train_mode_bn: bool = False) -> Iterator[nn.Module]:
    """Run a measurement on ``model`` and leave it exactly as it was, also on error.

    Inside the block the model is in measuring mode (:func:`set_measuring_mode`); on
    exit every submodule's mode, every parameter's value, ``.grad`` and
    ``requires_grad`` flag, and every buffer are restored bit for bit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    snapshot = _ModelSnapshot(model)
    try:
        set_measuring_mode(model, train_mode_bn)
        yield model
    finally:
        snapshot.restore()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters a measurement differentiates: those with ``requires_grad``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameters with requires_grad=True to measure")
    return named
