"""The base optimizer a SAM-family optimizer wraps: a class or any callable that builds one.

``base_optimizer(param_groups, **base_kwargs)`` must return a ``torch.optim.Optimizer``
over exactly the parameters given to SAM. So an optimizer class (``torch.optim.SGD``),
a ``functools.partial`` of one (``partial(torch.optim.SGD, nesterov=True)``, which is
what ``timm.optim.get_optimizer_class("sgd")`` returns) and a factory
(``lambda groups, **kw: timm.optim.create_optimizer_v2(groups, "sgd", **kw)``) all work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

OptimizerFactory = Callable[..., Optimizer]
"""An optimizer class, or any callable ``f(param_groups, **kwargs) -> Optimizer``."""


def check_factory(base_optimizer: Any, family: type) -> None:
    """Raise a TypeError unless ``base_optimizer`` can build a base optimizer."""
    if isinstance(base_optimizer, type):
        if issubclass(base_optimizer, family):
            raise TypeError(
                f"base_optimizer is {base_optimizer.__name__}, itself a SAM-family optimizer: "
                "pass the optimizer it should wrap, e.g. torch.optim.SGD"
            )
        if not issubclass(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD, got the "
                f"class {base_optimizer.__name__}, which is not a torch.optim.Optimizer"
            )
    elif not callable(base_optimizer):
        raise TypeError(
            "base_optimizer must be an optimizer class such as torch.optim.SGD (its keyword "
            "arguments go to SAM) or a callable that builds one from param groups and "
            f"keyword arguments, e.g. functools.partial(torch.optim.SGD, nesterov=True); got "
            f"{base_optimizer!r}"
        )


def build_base(
    base_optimizer: OptimizerFactory,
    param_groups: list[dict[str, Any]],
    base_kwargs: dict[str, Any],
    family: type,
) -> Optimizer:
    """``base_optimizer(param_groups, **base_kwargs)``, checked: an Optimizer that is not
    itself SAM-family, over exactly the parameters of ``param_groups``, each once."""
    base = base_optimizer(param_groups, **base_kwargs)
    if isinstance(base, family):
        raise TypeError(
            f"base_optimizer(...) returned a {type(base).__name__}, a SAM-family optimizer: "
            "the callable must build the optimizer that SAM wraps, e.g. torch.optim.SGD"
        )
    if not isinstance(base, Optimizer):
        raise TypeError(
            f"base_optimizer(...) returned {type(base).__name__}, expected a "
            "torch.optim.Optimizer built from the param groups it was given"
        )
    ours = [id(p) for group in param_groups for p in group["params"]]
    theirs = [id(p) for group in base.param_groups for p in group["params"]]
    if len(theirs) != len(set(theirs)) or set(ours) != set(theirs):
        raise ValueError(
            f"base_optimizer(...) built an optimizer over {len(theirs)} parameter tensors "
            f"that are not the {len(ours)} given to SAM: the callable must build the "
            "optimizer from the param groups it receives as first argument"
        )
    return base
