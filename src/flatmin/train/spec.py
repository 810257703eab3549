"""Method specifications: a name, hyperparameters with the paper's defaults, a factory.

A :class:`MethodSpec` describes a training method for the reference trainer; the
registrations live in :mod:`flatmin.train.registry`, one :func:`register` call per
method. Every :class:`Hyperparameter` becomes a command-line flag (``rho`` → ``--rho``);
a flag shared by several methods (``--lam`` for SAF and MESA) carries each method's own
default. A sketch (the real registrations, in :mod:`flatmin.train.registry`, spell out
the optimizer's arguments):

.. code-block:: text

    register(MethodSpec(
        "sam-adamw",
        "SAM over AdamW",
        (*ADAMW_HYPERPARAMETERS, Hyperparameter("rho", 0.05, "radius", minimum=0.0)),
        lambda model, hp, ctx: Method(SAM(model.parameters(), torch.optim.AdamW, ...),
                                      TwoPassUpdate()),
    ))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from flatmin.optim._checks import check_choice, check_int, check_real
from flatmin.train.method import Method, MethodContext

HyperValue = float | int | bool
MethodFactory = Callable[[nn.Module, Mapping[str, HyperValue], MethodContext], Method]


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: its name (a Python identifier), paper default and meaning;
    ``minimum``/``maximum`` bound numbers (inclusive)."""

    name: str
    default: HyperValue
    help: str
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> type:
        return type(self.default)

    def check(self, value: Any) -> HyperValue:
        """``value`` as this hyperparameter's type; ``ValueError`` if it is not one or is
        out of range (an integral float such as ``2.0`` is accepted for an int)."""
        try:
            if self.kind is bool:
                return check_choice(self.flag, value, (True, False))
            if self.kind is int:
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                return check_int(self.flag, value, minimum=self.minimum, maximum=self.maximum)
            return check_real(self.flag, value, minimum=self.minimum, maximum=self.maximum)
        except TypeError as error:
            raise ValueError(str(error)) from None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: name, one-line summary with its paper, hyperparameters, factory."""

    name: str
    summary: str
    hyperparameters: tuple[Hyperparameter, ...]
    build: MethodFactory

    def defaults(self) -> dict[str, HyperValue]:
        return {h.name: h.default for h in self.hyperparameters}

    def resolve(self, given: Mapping[str, Any]) -> dict[str, HyperValue]:
        """The full hyperparameter set: defaults overridden by ``given`` (checked)."""
        known = {h.name: h for h in self.hyperparameters}
        unknown = sorted(set(given) - set(known))
        if unknown:
            flags = ", ".join("--" + n.replace("_", "-") for n in unknown)
            raise ValueError(
                f"{flags} does not apply to method {self.name!r}; its hyperparameters are: "
                + ", ".join(h.flag for h in self.hyperparameters)
            )
        return {
            name: (h.check(given[name]) if name in given else h.default)
            for name, h in known.items()
        }

    def create(
        self, model: nn.Module, hyperparameters: Mapping[str, Any], context: MethodContext
    ) -> Method:
        """Build the method for ``model`` (hyperparameters are resolved and checked first)."""
        return self.build(model, self.resolve(hyperparameters), context)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS`; a name can be registered once."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    names = [h.name for h in spec.hyperparameters]
    if len(set(names)) != len(names):
        raise ValueError(f"method {spec.name!r} lists a hyperparameter twice: {names}")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def all_hyperparameters(
    specs: Iterable[MethodSpec] | None = None,
) -> dict[str, list[tuple[str, Hyperparameter]]]:
    """Each hyperparameter name → the (method, Hyperparameter) pairs that declare it."""
    table: dict[str, list[tuple[str, Hyperparameter]]] = {}
    for spec in METHODS.values() if specs is None else specs:
        for h in spec.hyperparameters:
            table.setdefault(h.name, []).append((spec.name, h))
    return table
