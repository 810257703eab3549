"""transformers: a ``Trainer`` that trains with any SAM-family optimizer, SAF and MESA.

The stock ``Trainer`` runs backward on each micro-batch and then calls
``optimizer.step()`` without a closure, which cannot drive a two-pass step.
:class:`FlatminTrainer` keeps the Trainer's own loop and puts the second pass inside it:

* each micro-batch's first pass is the stock ``training_step`` (loss scaling for
  accumulation, ``accelerator.backward``, the GradScaler);
* on the micro-batch that ends an optimizer step, ``first_step`` moves to ``w + ε`` and
  every micro-batch of the step runs again there, with BatchNorm statistics frozen;
* the Trainer then clips, and its ``optimizer.step()`` is ``second_step``: ``w`` is
  restored exactly and the base optimizer steps. A GradScaler that skips the step
  (overflow in either pass) leaves the weights at ``w``.

The loss the Trainer logs is the first pass's. Gradient accumulation
(``gradient_accumulation_steps``) gives the README's recipe: ε from the accumulated
gradient, the update from all micro-batches at ``w + ε``. ``max_grad_norm`` clips the
surrogate gradient; for members whose update uses the first-pass gradient (StableSAM's
rescaling, GSAM, LookSAM) the Trainer refuses it — pass ``max_grad_norm`` to the
optimizer, which clips the final direction, and ``max_grad_norm=0`` to the Trainer.

SAF and MESA: pass them as ``saf=`` / ``mesa=``. The Trainer adds ``saf(logits, idx)``
(the dataset's items carry their index as ``"idx"``; needs
``remove_unused_columns=False``) and ``mesa(inputs, logits)`` to the model's loss, calls
``set_epoch`` at each epoch, ``mesa.update()`` after each optimizer step, and saves both
in its checkpoints (``flatmin_terms.pt``), so ``train(resume_from_checkpoint=...)`` is
bit-exact. MESA calls its teacher as ``teacher(inputs)``: build it on
``LogitsOf(model)``, which takes the input dict and returns ``.logits``.

.. test: skip="a part of examples/transformers_trainer.py, which tests/examples runs"

Example::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
    trainer = FlatminTrainer(model=model, args=args, train_dataset=data,
                             optimizers=(opt, None))
    trainer.train()

Any other optimizer (the Trainer's own when ``optimizers`` is not given) is stepped as
the stock Trainer does, so the terms also work without SAM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from flatmin.optim import SAM
from flatmin.optim.bn import running_stats_frozen
from flatmin.trajectory import MESA, SAF

TERMS_FILE = "flatmin_terms.pt"


class LogitsOf(nn.Module):
    """``model(**inputs).logits``: a transformers model as MESA's teacher wants it.

    .. test: skip="a part of examples/transformers_trainer.py, which tests/examples runs"

    Example::

        mesa = MESA(LogitsOf(model), lam=0.8)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return self.model(**inputs).logits


class _SecondStepOnStep(Optimizer):
    """The optimizer the Trainer steps: ``step()`` finishes the SAM step begun in
    ``training_step`` (``second_step``, or LookSAM's reuse update). An ``Optimizer`` so
    that LR schedulers accept it; like accelerate's own wrapper it shares the wrapped
    optimizer's ``param_groups``, ``state`` and ``defaults`` instead of running
    ``Optimizer.__init__``."""

    def __init__(self, sam: SAM) -> None:  # no super().__init__: nothing of its own
        self.sam = sam
        self.reuse_pending = False

    param_groups = property(lambda self: self.sam.param_groups)
    state = property(lambda self: self.sam.state)
    defaults = property(lambda self: self.sam.defaults)

    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            return self.sam.step(closure)
        if self.reuse_pending:
            self.reuse_pending = False
            self.sam.first_step()  # LookSAM's reuse step: the whole update
        elif self.sam.is_perturbed:
            self.sam.second_step()
        else:
            raise RuntimeError(
                "FlatminTrainer: optimizer.step() came without the first pass of a SAM step; "
                "the step starts in training_step"
            )
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.sam.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.sam.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sam.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"FlatminTrainer's step of {self.sam!r}"


class _TermsCallback(TrainerCallback):
    """set_epoch, MESA's update, the terms in the checkpoints, and an abandoned SAM step
    (a GradScaler skipped it) undone."""

    def __init__(self, trainer: FlatminTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        reference = next(model.parameters(), None) if model is not None else None
        if self.trainer.mesa is not None and reference is not None:
            self.trainer.mesa.to(reference.device)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = int((state.epoch or 0.0) + 1e-6)  # state.epoch is fractional mid-epoch
        for term in self.trainer.terms.values():
            term.set_epoch(epoch)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sam = self.trainer.sam
        if sam is not None and sam.is_perturbed:  # the GradScaler skipped second_step
            sam.abandon_step()
        mesa = self.trainer.mesa
        if mesa is not None and mesa.updates_teacher:
            mesa.update()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        terms = self.trainer.terms
        if terms and args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(
                {n: t.state_dict() for n, t in terms.items()}, os.path.join(folder, TERMS_FILE)
            )


class FlatminTrainer(Trainer):
    """A ``transformers.Trainer`` for SAM-family optimizers and SAF / MESA (module doc).

    Args:
        args, kwargs: the ``Trainer``'s positional and keyword arguments.
        saf: a :class:`flatmin.SAF` over the training set (items carry ``"idx"``).
        mesa: a :class:`flatmin.MESA`, built on :class:`LogitsOf` of the model.
    """

    def __init__(
        self, *args: Any, saf: SAF | None = None, mesa: MESA | None = None, **kwargs: Any
    ) -> None:
        self.saf, self.mesa = saf, mesa  # before super().__init__, which may build the optimizer
        super().__init__(*args, **kwargs)
        self.terms: dict[str, SAF | MESA] = {
            name: term for name, term in (("saf", saf), ("mesa", mesa)) if term is not None
        }
        if saf is not None and self.args.remove_unused_columns:
            raise ValueError(
                "FlatminTrainer with saf= reads each item's 'idx', which the Trainer drops "
                "(remove_unused_columns=True): pass TrainingArguments(remove_unused_columns=False)"
            )
        self.sam: SAM | None = None
        self._proxy: _SecondStepOnStep | None = None
        self._micro_batches: list[tuple[Any, Any]] = []
        self.add_callback(_TermsCallback(self))
        if self.optimizer is not None:
            self.optimizer = self._wrap(self.optimizer)

    def _wrap(self, optimizer: Optimizer) -> Optimizer:
        if not isinstance(optimizer, SAM) or isinstance(optimizer, _SecondStepOnStep):
            return optimizer
        if self.args.max_grad_norm and (optimizer.uses_clean_gradient or not optimizer.normalize):
            raise ValueError(
                f"TrainingArguments(max_grad_norm={self.args.max_grad_norm}) clips the surrogate "
                f"gradient before {type(optimizer).__name__} forms its update from it and the "
                "first-pass gradient: pass max_grad_norm=0 to the Trainer and max_grad_norm to "
                "the optimizer, which clips the final direction"
            )
        if self.saf is not None and self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                "saf= with a SAM-family optimizer and gradient_accumulation_steps > 1 is not "
                "supported: SAF re-reads only the last batch for a second pass, and the "
                "Trainer's second passes revisit every micro-batch of the step; use "
                "gradient_accumulation_steps=1 (a larger per-device batch) or MESA"
            )
        self.sam = optimizer
        self._proxy = _SecondStepOnStep(optimizer)
        return self._proxy

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        self.optimizer = self._wrap(super().create_optimizer(model))
        return self.optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint and self.terms:
            path = os.path.join(resume_from_checkpoint, TERMS_FILE)
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for name, term in self.terms.items():
                term.load_state_dict(saved[name])
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if not self.terms:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        idx = inputs.pop("idx", None)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        logits = outputs["logits"]
        if self.saf is not None:
            if idx is None:
                raise ValueError("FlatminTrainer with saf= needs each item's index as 'idx'")
            loss = loss + self.saf(logits, idx)
        if self.mesa is not None:
            features = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
            loss = loss + self.mesa(features, logits)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        sam = self.sam
        if sam is None:
            return loss
        self._micro_batches.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss
        micro_batches, self._micro_batches = self._micro_batches, []
        if getattr(sam, "is_reuse_step", False):
            self._proxy.reuse_pending = True  # LookSAM: one pass this step
            return loss
        scaler = self.accelerator.scaler
        sam.first_step(zero_grad=True, grad_scaler=scaler)
        try:
            with running_stats_frozen(sam.model if sam.model is not None else model):
                for micro, count in micro_batches:
                    super().training_step(model, micro, count)
        except BaseException:
            sam.abandon_step()
            raise
        if scaler is not None:
            sam.fold_first_pass_check()  # the scaler's unscale_ then sees both passes
        return loss


__all__ = ["FlatminTrainer", "LogitsOf"]
