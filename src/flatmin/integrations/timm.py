"""timm: the SAM family in timm's optimizer registry.

.. test: skip="timm needs a torchvision built for this torch (tests/integrations skips timm likewise)"

Every SAM-family constructor takes any callable that builds the base optimizer, so
timm's own factories already work as a base::

    opt = SAM(model.parameters(), timm.optim.get_optimizer_class("sgd"), lr=0.1, momentum=0.9)

.. test: skip="timm needs a torchvision built for this torch (tests/integrations skips timm likewise)"

:func:`register_timm_optimizers` adds one registry entry per (family member, base):
``"samsgd"``, ``"samadamw"``, ``"gsamsgd"``, ``"looksamadamw"``, … (timm reads the text
after the last ``_`` of a name, so the names have none). Each entry keeps its base's
settings (which of ``momentum``, ``eps``, ``betas`` timm passes, its defaults), so
``create_optimizer_v2`` builds the member around timm's base, with timm's weight-decay
groups; the member's own keywords (``rho``, ``model``, ``alpha``, …) pass through::

    register_timm_optimizers()
    opt = timm.optim.create_optimizer_v2(model, "samsgd", lr=0.1, rho=0.05, model=model)

timm imports torchvision, which must be a build for your torch; flatmin does not install
either (``pip install timm`` next to a matching torchvision).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from timm.optim import _optim_factory  # default_registry is not exported by timm.optim

from flatmin.optim import ASAM, ESAM, GSAM, SAM, LookSAM, StableSAM

FAMILY: dict[str, type[SAM]] = {
    "sam": SAM,
    "asam": ASAM,
    "stablesam": StableSAM,
    "gsam": GSAM,
    "looksam": LookSAM,
    "esam": ESAM,
}
BASES = ("sgd", "momentum", "adamw", "adam")


def family_keywords(family: type[SAM]) -> frozenset[str]:
    """The keyword arguments of ``family``'s constructor and SAM's (not the base's)."""
    names: set[str] = set()
    for cls in (family, SAM):
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                names.add(name)
    return frozenset(names - {"self", "params", "base_optimizer"})


def _build(params: Any, *, family: type[SAM], base: str, registry: Any, **kwargs: Any) -> SAM:
    base_optimizer = registry.get_optimizer_class(base, bind_defaults=False)
    own = family_keywords(family)
    mine = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
    return family(params, base_optimizer, **mine, **kwargs)


def register_timm_optimizers(
    families: dict[str, type[SAM]] | None = None,
    bases: tuple[str, ...] = BASES,
    registry: Any = None,
) -> list[str]:
    """Register ``prefix + base`` for every family member and base; return the names.

    Args:
        families: name prefix → SAM-family class (default: ``FAMILY``).
        bases: names of timm optimizers to wrap (default: sgd, momentum, adamw, adam).
        registry: a timm ``OptimizerRegistry`` (default: timm's own).
    """
    registry = registry if registry is not None else _optim_factory.default_registry
    names = []
    for prefix, family in (families or FAMILY).items():
        for base in bases:
            info = registry.get_optimizer_info(base)
            name = f"{prefix}{base}"
            if "_" in name:
                raise ValueError(f"timm cannot look up a name with '_' such as {name!r}")
            registry.register(
                dataclasses.replace(
                    info,
                    name=name,
                    opt_class=functools.partial(
                        _build, family=family, base=base, registry=registry
                    ),
                    description=f"{family.__name__} around timm's {base!r}: {info.description}",
                    second_order=False,
                )
            )
            names.append(name)
    return names


__all__ = ["BASES", "FAMILY", "family_keywords", "register_timm_optimizers"]
