"""The method registry: a method's name maps to everything a training step needs.

A :class:`MethodSpec` names a method, lists its hyperparameters with the paper's
defaults, and builds a :class:`Method` for a model: the optimizer, the update rule (one
forward/backward pass, or the SAM family's two) and the loss terms added to the
cross-entropy (SAF's logit store, MESA's EMA teacher). The training loop drives every
method through the same three calls — :meth:`Method.set_epoch`, :meth:`Method.train_step`
and :meth:`Method.state_dict` — so it has no per-method branches, and a new method is one
:func:`register` call::

    register(MethodSpec(
        name="sam-adamw",
        summary="SAM over AdamW",
        hyperparameters=(*ADAMW_HYPERPARAMETERS, Hyperparameter("rho", 0.05, "radius")),
        build=lambda model, hp, ctx: Method(
            SAM(model.parameters(), torch.optim.AdamW, rho=hp["rho"], lr=hp["lr"], ...),
            TwoPassUpdate(),
        ),
    ))

Every hyperparameter becomes a command-line flag (``rho`` → ``--rho``); a flag shared by
several methods (``--lam`` for SAF and MESA) carries each method's own default.

Update rules: :class:`SinglePassUpdate` (``optimizer.step()``), :class:`TwoPassUpdate`
(``optimizer.step(closure, model=model)``: the optimizer decides how many passes a step
takes) and :class:`PerSampleTwoPassUpdate` (the closure returns per-sample objectives, for
ESAM's data selection). Loss terms: :class:`SAFTerm`, :class:`MESATerm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

HyperValue = float | int | bool


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: its name (a Python identifier), paper default and meaning."""

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
        """``value`` converted to this hyperparameter's type; ValueError if out of range."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.flag} expects true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.flag} expects a number, got {value!r}")
        if self.kind is int and value != int(value):
            raise ValueError(f"{self.flag} expects an integer, got {value!r}")
        value = self.kind(value)
        if not math.isfinite(value):
            raise ValueError(f"{self.flag} must be finite, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.flag} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.flag} must be <= {self.maximum}, got {value!r}")
        return value


@dataclass(frozen=True)
class MethodContext:
    """Facts about the training run a method may need to build itself."""

    num_samples: int
    num_classes: int
    seed: int = 0  # for methods that draw random numbers of their own (ESAM)


class StepOutput(NamedTuple):
    """What one training step reports: the first pass's criterion loss and logits."""

    loss: Tensor
    logits: Tensor


class PassOutput(NamedTuple):
    """One forward pass: ``objective`` (criterion + loss terms, batch mean) is what is
    differentiated; ``loss`` is the criterion's mean alone, comparable across methods;
    ``per_sample`` is the objective per sample when the criterion gives per-sample losses
    (else the batch mean again)."""

    objective: Tensor
    loss: Tensor
    logits: Tensor
    per_sample: Tensor


class ComputePass(Protocol):
    """``compute(first_pass, rows=None)``: a forward pass over the batch, or its ``rows``."""

    def __call__(self, first_pass: bool, rows: Tensor | None = None) -> PassOutput: ...


class UpdateRule(Protocol):
    """How gradients become an optimizer update; ``compute(first_pass)`` runs one pass."""

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, compute: ComputePass
    ) -> PassOutput: ...

    def extra_memory_bytes(self, model: nn.Module) -> int: ...


class LossTerm(Protocol):
    """A term added to the objective, with per-epoch and per-step hooks and state."""

    def __call__(self, x: Tensor, logits: Tensor, index: Tensor, first_pass: bool) -> Tensor: ...

    def set_epoch(self, epoch: int) -> None: ...

    def after_step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    @property
    def memory_bytes(self) -> int: ...


class SinglePassUpdate:
    """Plain training: one forward/backward, then ``optimizer.step()``."""

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, compute: ComputePass
    ) -> PassOutput:
        optimizer.zero_grad(set_to_none=True)
        out = compute(True)
        out.objective.backward()
        optimizer.step()
        return out

    def extra_memory_bytes(self, model: nn.Module) -> int:
        return 0


class TwoPassUpdate:
    """The SAM family's step (Foret et al., ICLR 2021), driven by ``optimizer.step(closure)``.

    First pass at ``w``: ``g = ∇L(w)``; the optimizer moves to ``w + ε``; second pass at
    ``w + ε`` with BatchNorm running statistics frozen (they move once per step, from the
    first pass, via ``model=``); the optimizer restores ``w`` and applies the base
    optimizer with the surrogate gradient. Going through ``step(closure)`` lets each
    family member decide how many passes a step takes (LookSAM's reuse steps take one)
    and restores the weights if the second pass raises (Ctrl-C included). The loss terms
    see ``first_pass=False`` on later passes, so SAF records the batch once.

    ``weight_copies``: how many parameter-sized buffers the optimizer keeps (SAM: the copy
    of ``w``; GSAM adds the clean gradient ``g``; LookSAM that and its kept ``g_v``), for
    :meth:`extra_memory_bytes`.
    """

    def __init__(self, weight_copies: int = 1) -> None:
        self.weight_copies = weight_copies

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, compute: ComputePass
    ) -> PassOutput:
        passes: list[PassOutput] = []

        def closure() -> Tensor:
            out = compute(not passes)
            out.objective.backward()
            passes.append(out)
            return out.objective

        optimizer.zero_grad(set_to_none=True)
        optimizer.step(closure, model=model)  # type: ignore[call-arg]
        return passes[0]

    def extra_memory_bytes(self, model: nn.Module) -> int:
        """The parameter-sized buffers kept between the passes (trainable parameters)."""
        return self.weight_copies * _parameter_bytes(model)


class Method:
    """What the training loop drives: an optimizer, an update rule and loss terms."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        update: UpdateRule | None = None,
        terms: Mapping[str, LossTerm] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.update = update if update is not None else SinglePassUpdate()
        self.terms = dict(terms or {})

    def set_epoch(self, epoch: int) -> None:
        """Per-epoch hook, called with the 0-based epoch before its first step."""
        for term in self.terms.values():
            term.set_epoch(epoch)

    def train_step(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        index: Tensor,
        criterion: Callable[[Tensor, Tensor], Tensor],
    ) -> StepOutput:
        """One optimizer step on the batch ``(x, y)`` whose dataset positions are ``index``.

        ``criterion(logits, y)`` returns per-sample losses (``reduction="none"``, which
        ESAM's data selection needs) or their mean.
        """

        def compute(first_pass: bool, rows: Tensor | None = None) -> PassOutput:
            xb, yb, ib = (x, y, index) if rows is None else (x[rows], y[rows], index[rows])
            logits = model(xb)
            per_sample = criterion(logits, yb)
            objective = per_sample
            for term in self.terms.values():
                objective = objective + term(xb, logits, ib, first_pass)
            return PassOutput(objective.mean(), per_sample.mean(), logits, objective)

        out = self.update.step(model, self.optimizer, compute)
        for term in self.terms.values():
            term.after_step()
        return StepOutput(out.loss.detach(), out.logits.detach())

    def state_dict(self) -> dict[str, Any]:
        """The loss terms' state (the optimizer's is saved separately)."""
        return {name: term.state_dict() for name, term in self.terms.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.terms):
            raise ValueError(
                f"method state holds terms {sorted(state)}, expected {sorted(self.terms)}"
            )
        for name, term in self.terms.items():
            term.load_state_dict(state[name])

    def extra_memory_bytes(self, model: nn.Module) -> int:
        """Bytes the method holds beyond its base optimizer: the update rule's (SAM's
        copy of ``w`` between the passes) plus the loss terms' (SAF's store, MESA's
        teacher). Counted from the tensors' sizes, not measured."""
        return self.update.extra_memory_bytes(model) + sum(
            term.memory_bytes for term in self.terms.values()
        )


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


MethodFactory = Callable[[nn.Module, Mapping[str, HyperValue], MethodContext], Method]


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


def all_hyperparameters(specs: Iterable[MethodSpec] | None = None) -> dict[str, list]:
    """Each hyperparameter name → the (method, Hyperparameter) pairs that declare it."""
    table: dict[str, list[tuple[str, Hyperparameter]]] = {}
    for spec in METHODS.values() if specs is None else specs:
        for h in spec.hyperparameters:
            table.setdefault(h.name, []).append((spec.name, h))
    return table


# --- base optimizers -----------------------------------------------------------------

SGD_HYPERPARAMETERS = (
    Hyperparameter("lr", 0.1, "peak learning rate", minimum=0.0),
    Hyperparameter("momentum", 0.9, "SGD momentum", minimum=0.0, maximum=1.0),
    Hyperparameter(
        "weight_decay",
        5e-4,
        "weight decay (SGD: L2 in the gradient; AdamW: decoupled)",
        minimum=0.0,
    ),
    Hyperparameter("nesterov", False, "Nesterov momentum"),
)

ADAMW_HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, "peak learning rate", minimum=0.0),
    Hyperparameter("beta1", 0.9, "Adam β1", minimum=0.0, maximum=1.0),
    Hyperparameter("beta2", 0.999, "Adam β2", minimum=0.0, maximum=1.0),
    Hyperparameter(
        "weight_decay",
        0.01,
        "weight decay (SGD: L2 in the gradient; AdamW: decoupled)",
        minimum=0.0,
    ),
)


def _sgd_kwargs(hp: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "lr": hp["lr"],
        "momentum": hp["momentum"],
        "weight_decay": hp["weight_decay"],
        "nesterov": hp["nesterov"],
    }


def _adamw_kwargs(hp: Mapping[str, Any]) -> dict[str, Any]:
    return {"lr": hp["lr"], "betas": (hp["beta1"], hp["beta2"]), "weight_decay": hp["weight_decay"]}


def _build_sgd(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    return Method(torch.optim.SGD(model.parameters(), **_sgd_kwargs(hp)))


def _build_adamw(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    return Method(torch.optim.AdamW(model.parameters(), **_adamw_kwargs(hp)))


register(
    MethodSpec(
        "sgd",
        "SGD with momentum, the baseline of every paper here",
        SGD_HYPERPARAMETERS,
        _build_sgd,
    )
)
register(
    MethodSpec(
        "adamw",
        "AdamW (Loshchilov & Hutter, ICLR 2019)",
        ADAMW_HYPERPARAMETERS,
        _build_adamw,
    )
)


# --- the SAM family: two passes per step ---------------------------------------------

RHO_HELP = "neighbourhood radius ρ of the perturbation"


def _sam_family(**options: Any) -> MethodFactory:
    """A factory for ``flatmin.SAM`` over SGD with the fixed ``options`` (adaptive, …)."""

    def build(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
        from flatmin.optim.sam import SAM

        extra = {k: hp[k] for k in ("eta", "stable_cap") if k in hp}
        # Named parameters let ASAM tell weights from biases by name (official rule).
        params = model.named_parameters() if options.get("adaptive") else model.parameters()
        optimizer = SAM(
            params, torch.optim.SGD, rho=hp["rho"], **options, **extra, **_sgd_kwargs(hp)
        )
        return Method(optimizer, TwoPassUpdate())

    return build


register(
    MethodSpec(
        "sam",
        "Sharpness-Aware Minimization over SGD (Foret et al., ICLR 2021)",
        (*SGD_HYPERPARAMETERS, Hyperparameter("rho", 0.05, RHO_HELP, minimum=0.0)),
        _sam_family(),
    )
)
register(
    MethodSpec(
        "asam",
        "Adaptive SAM, official form T_w = |w| + η on weights (Kwon et al., ICML 2021)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("rho", 0.5, RHO_HELP, minimum=0.0),
            Hyperparameter("eta", 0.01, "ASAM's η in T_w = |w| + η", minimum=0.0),
        ),
        _sam_family(adaptive="weights"),
    )
)
register(
    MethodSpec(
        "usam",
        "unnormalized SAM, ε = ρ·g (Andriushchenko & Flammarion, ICML 2022)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("rho", 0.05, RHO_HELP + " (no paper default: SAM's)", minimum=0.0),
        ),
        _sam_family(normalize=False),
    )
)
register(
    MethodSpec(
        "stablesam",
        "SAM with the surrogate gradient renormalized to ‖g‖ (Tan et al., 2024)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("rho", 0.05, RHO_HELP, minimum=0.0),
            Hyperparameter("stable_cap", False, "cap the renormalization factor at 1"),
        ),
        _sam_family(stable=True),
    )
)


class PerSampleTwoPassUpdate(TwoPassUpdate):
    """ESAM's step (Du et al., ICLR 2022): the closure returns per-sample objectives and
    runs no backward, so the optimizer can pick the samples of the second pass."""

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, compute: ComputePass
    ) -> PassOutput:
        passes: list[PassOutput] = []

        def closure(indices: Tensor | None = None) -> Tensor:
            out = compute(not passes, indices)
            passes.append(out)
            return out.per_sample

        optimizer.zero_grad(set_to_none=True)
        optimizer.step(closure, model=model)  # type: ignore[call-arg]
        return passes[0]


ALPHA_HELP = "α: GSAM's weight of −g_⊥; LookSAM's weight of the reused direction g_v"


def _family_member(
    class_path: str, options: tuple[str, ...], update: UpdateRule, *, seeded: bool = False
) -> MethodFactory:
    """A factory for a SAM-family optimizer class over SGD, given its option names;
    ``seeded`` passes the run's seed (for methods with random draws of their own)."""

    def build(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
        import importlib

        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        extra = {k: hp[k] for k in options}
        if seeded:
            extra["seed"] = ctx.seed
        optimizer = cls(model.parameters(), torch.optim.SGD, **extra, **_sgd_kwargs(hp))
        return Method(optimizer, update)

    return build


register(
    MethodSpec(
        "gsam",
        "surrogate-gap guided SAM, d = g_s − α·g_⊥, ρ following the LR (Zhuang et al., ICLR 2022)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("rho", 0.05, RHO_HELP + " (GSAM: ρ_max)", minimum=0.0),
            Hyperparameter("alpha", 0.4, ALPHA_HELP, minimum=0.0),
            Hyperparameter("rho_min", 0.0, "GSAM's ρ_min, reached when the LR is 0", minimum=0.0),
        ),
        _family_member(
            "flatmin.optim.gsam.GSAM", ("rho", "alpha", "rho_min"), TwoPassUpdate(weight_copies=2)
        ),
    )
)
register(
    MethodSpec(
        "looksam",
        "SAM's second pass every k-th step, its direction reused in between (Liu et al., "
        "CVPR 2022)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("rho", 0.05, RHO_HELP, minimum=0.0),
            Hyperparameter("k", 5, "LookSAM: a full SAM step every k steps", minimum=1),
            Hyperparameter("alpha", 0.7, ALPHA_HELP, minimum=0.0),
        ),
        _family_member(
            "flatmin.optim.looksam.LookSAM",
            ("rho", "k", "alpha"),
            TwoPassUpdate(weight_copies=3),  # w's copy, the kept g_v, the clean gradient
        ),
    )
)
register(
    MethodSpec(
        "esam",
        "efficient SAM: random weight subsets and sharpness-selected samples (Du et al., "
        "ICLR 2022)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("rho", 0.05, RHO_HELP, minimum=0.0),
            Hyperparameter(
                "beta",
                0.6,
                "ESAM: probability a weight tensor is perturbed",
                minimum=0.0,
                maximum=1.0,
            ),
            Hyperparameter(
                "gamma",
                0.5,
                "ESAM: fraction of the batch in the second pass",
                minimum=0.0,
                maximum=1.0,
            ),
        ),
        _family_member(
            "flatmin.optim.esam.ESAM",
            ("rho", "beta", "gamma"),
            PerSampleTwoPassUpdate(),
            seeded=True,
        ),
    )
)


# --- trajectory losses: one pass plus a loss term -------------------------------------


class SAFTerm:
    """Adapts :class:`flatmin.SAF` to :class:`LossTerm`: records on the first pass only."""

    def __init__(self, saf: Any) -> None:
        self.saf = saf

    def __call__(self, x: Tensor, logits: Tensor, index: Tensor, first_pass: bool) -> Tensor:
        return self.saf(logits, index, record=first_pass)

    def set_epoch(self, epoch: int) -> None:
        self.saf.set_epoch(epoch)

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.saf.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.saf.load_state_dict(dict(state))

    @property
    def memory_bytes(self) -> int:
        return self.saf.memory_bytes


class MESATerm:
    """Adapts :class:`flatmin.MESA` to :class:`LossTerm`: the EMA moves after each step."""

    def __init__(self, mesa: Any) -> None:
        self.mesa = mesa

    def __call__(self, x: Tensor, logits: Tensor, index: Tensor, first_pass: bool) -> Tensor:
        return self.mesa(x, logits)

    def set_epoch(self, epoch: int) -> None:
        self.mesa.set_epoch(epoch)

    def after_step(self) -> None:
        self.mesa.update()

    def state_dict(self) -> dict[str, Any]:
        return self.mesa.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mesa.load_state_dict(dict(state))

    @property
    def memory_bytes(self) -> int:
        return self.mesa.memory_bytes


START_HELP = "0-based epoch after which the KL term is active (active when epoch > it)"


def _build_saf(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    from flatmin.trajectory.saf import SAF

    saf = SAF(
        ctx.num_samples,
        ctx.num_classes,
        lam=hp["lam"],
        tau=hp["tau"],
        lag_epochs=hp["lag_epochs"],
        start_epoch=hp["start_epoch"],
    )
    optimizer = torch.optim.SGD(model.parameters(), **_sgd_kwargs(hp))
    return Method(optimizer, SinglePassUpdate(), {"saf": SAFTerm(saf)})


def _build_mesa(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    from flatmin.trajectory.mesa import MESA

    mesa = MESA(
        model,
        decay=hp["ema_decay"],
        lam=hp["lam"],
        tau=hp["tau"],
        start_epoch=hp["start_epoch"],
        warmup=hp["ema_warmup"],
    )
    optimizer = torch.optim.SGD(model.parameters(), **_sgd_kwargs(hp))
    return Method(optimizer, SinglePassUpdate(), {"mesa": MESATerm(mesa)})


register(
    MethodSpec(
        "saf",
        "Sharpness-Aware training for Free: KL to the logits of Ẽ epochs ago (Du et al., "
        "NeurIPS 2022)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("lam", 0.3, "weight λ of the trajectory KL term", minimum=0.0),
            Hyperparameter("tau", 5.0, "temperature τ of the KL term", minimum=1e-12),
            Hyperparameter("lag_epochs", 3, "SAF's lag Ẽ in epochs", minimum=1),
            Hyperparameter("start_epoch", 5, START_HELP, minimum=0),
        ),
        _build_saf,
    )
)
register(
    MethodSpec(
        "mesa",
        "Memory-Efficient SAF: KL to an EMA teacher (Du et al., NeurIPS 2022)",
        (
            *SGD_HYPERPARAMETERS,
            Hyperparameter("lam", 0.8, "weight λ of the trajectory KL term", minimum=0.0),
            Hyperparameter("tau", 5.0, "temperature τ of the KL term", minimum=1e-12),
            Hyperparameter("ema_decay", 0.9998, "MESA's EMA decay β", minimum=0.0, maximum=1.0),
            Hyperparameter("ema_warmup", False, "EMA decay warm-up min(β, (1+t)/(10+t))"),
            Hyperparameter("start_epoch", 5, START_HELP, minimum=0),
        ),
        _build_mesa,
    )
)
