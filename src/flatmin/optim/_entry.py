"""The public methods that drive a SAM-family step: always eager, always on the real optimizer.

A step moves the weights to ``w + ε`` and back between two forward/backward passes and
keeps a copy of ``w`` in between, so it runs eagerly: each such method behaves as if
wrapped in ``torch.compiler.disable`` (:func:`step_entry`). ``torch.compile(opt.step)``
then runs the step eagerly (a graph break), and ``torch.compile(opt.step,
fullgraph=True)`` refuses before anything runs. Compile the model instead:
``torch.compile(model)`` works with every member.

Frameworks may hand the user a proxy whose class imitates the optimizer's:
Lightning's ``LightningOptimizer`` becomes a subclass of the wrapped optimizer's class and
forwards attribute reads to it, so ``proxy.first_step()`` would run SAM's code with the
proxy as ``self`` and write the step's state (the copy of ``w``, counters) onto the proxy.
These methods therefore find the real optimizer held by such a proxy and run there.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.optim import Optimizer

F = TypeVar("F", bound=Callable[..., Any])

EAGER_REASON = (
    "a SAM-family step moves the weights to w + ε and back between two forward/backward "
    "passes and runs eagerly; compile the model (torch.compile(model)) instead of the step"
)


def real_optimizer(obj: Any) -> Any:
    """``obj`` itself, or the SAM-family optimizer that a framework's proxy of it holds.

    A proxy is recognised by not having been built by the SAM constructor (no
    ``base_optimizer`` of its own) while holding an object that was.
    """
    own = vars(obj)
    if "base_optimizer" in own:
        return obj
    for value in own.values():
        if isinstance(value, Optimizer) and "base_optimizer" in vars(value):
            return value
    return obj


def step_entry(method: F) -> F:
    """Decorate a public step method: run it on :func:`real_optimizer`, never compiled.

    The wrapper carries the marks of ``torch.compiler.disable`` (dynamo does not trace
    into it: a graph break, or a refusal under ``fullgraph=True``), and once dynamo has
    been imported it calls the method through ``torch.compiler.disable`` so that the
    frames below run eagerly too. Until then nothing can be compiling, so importing
    flatmin does not import dynamo (about a second and 70 MB).
    """

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        real = real_optimizer(self)
        if real is not self:
            return getattr(real, method.__name__)(*args, **kwargs)
        if "torch._dynamo" in sys.modules:
            return _eager(method)(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    run._torchdynamo_disable = True  # type: ignore[attr-defined]
    run._torchdynamo_disable_msg = EAGER_REASON  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


@functools.cache
def _eager(method: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compiler.disable(method, reason=EAGER_REASON)


def no_closure_error(optimizer_name: str) -> ValueError:
    """The error of ``step()`` without a closure, naming the callers that do this."""
    return ValueError(
        f"{optimizer_name}.step() needs a closure that runs the forward and backward pass "
        "and returns the loss, e.g. opt.step(lambda: (loss := loss_fn(model(x), "
        "y)).backward() or loss), or call first_step() and second_step() yourself. A caller "
        "that runs backward itself and then calls optimizer.step() cannot drive a two-pass "
        "step: GradScaler.step(optimizer) (pass grad_scaler= to step() or to both passes "
        "instead), Lightning's precision='16-mixed' (use "
        "flatmin.integrations.lightning.SAMPrecision), accelerate with fp16 (call "
        "optimizer.optimizer.step(closure, grad_scaler=accelerator.scaler)), transformers' "
        "Trainer (use flatmin.integrations.transformers.FlatminTrainer). See the README section "
        "'Use with your framework'."
    )
