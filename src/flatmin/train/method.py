"""What the training loop drives: a :class:`Method` = optimizer + update rule + loss terms.

The loop calls :meth:`Method.set_epoch`, :meth:`Method.train_step` and
:meth:`Method.state_dict` for every method alike, so it has no per-method branches.

Update rules: :class:`SinglePassUpdate` (``optimizer.step()``), :class:`TwoPassUpdate`
(``optimizer.step(closure, model=model)``: the optimizer decides how many passes a step
takes) and :class:`PerSampleTwoPassUpdate` (the closure returns per-sample objectives, for
ESAM's data selection). Loss terms adapt SAF and MESA to :class:`LossTerm`:
:class:`SAFTerm`, :class:`MESATerm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn


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


class SAFTerm:
    """Adapts :class:`flatmin.SAF` (or its distributed form) to :class:`LossTerm`: records
    on the first pass only."""

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
    """Adapts :class:`flatmin.MESA` (or its distributed form) to :class:`LossTerm`: the EMA
    moves after each step."""

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
