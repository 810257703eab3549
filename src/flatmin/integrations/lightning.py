"""Lightning: SAF and MESA driven by a callback, the SAM family checked and mixed precision.

.. test: skip="a part of examples/lightning_sam.py, which tests/examples runs"

SAM in **automatic optimization** needs nothing from this module: return the optimizer
from ``configure_optimizers`` with ``model=`` (Lightning's ``optimizer_step`` cannot
forward it), and Lightning's ``optimizer.step(closure)`` runs both passes with the
BatchNorm statistics kept to the first. ``training_step`` runs twice per step; log in
the first pass only::

    class Module(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if not self.optimizers().is_perturbed:       # the first pass, at w
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return SAM(self.net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1,
                       model=self.net)

In **manual optimization** call ``opt.step(closure=...)`` (Lightning counts the step);
gradient accumulation is every micro-batch inside that one closure. The explicit
``first_step``/``second_step`` also work on ``self.optimizers()`` but Lightning does
not count them as a step (``trainer.global_step`` stays put).

:class:`FlatminCallback` calls ``set_epoch`` on every SAF and MESA the LightningModule
holds as an attribute at the start of each training epoch, ``mesa.update()`` after each
optimizer step, and saves SAF's store in Lightning's checkpoints (MESA is a submodule:
Lightning already moves, casts and saves it with the module), so that
``Trainer.fit(ckpt_path=...)`` resumes bit-exactly. At fit start it refuses settings
under which a SAM-family optimizer would train wrongly: ``accumulate_grad_batches > 1``
in automatic optimization, a GradScaler precision plugin other than
:class:`SAMPrecision`, and ``gradient_clip_val`` with a member whose update uses the
first-pass gradient (Lightning clips after each pass; ``SAM(max_grad_norm=...)`` clips
the final direction instead).

:class:`SAMPrecision` is ``precision="16-mixed"`` with a GradScaler for SAM-family
optimizers: it hands Lightning's closure to ``optimizer.step(closure,
grad_scaler=...)``, which unscales once and skips non-finite steps.

Builds on ``lightning.pytorch`` when the ``lightning`` package is installed, else on
``pytorch_lightning``.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch

from flatmin.optim import SAM
from flatmin.trajectory import MESA, SAF

if importlib.util.find_spec("lightning") is not None:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision
else:
    import pytorch_lightning as pl
    from pytorch_lightning.plugins import MixedPrecision

Term = SAF | MESA


def trajectory_terms(module: torch.nn.Module) -> dict[str, Term]:
    """Every SAF and MESA that ``module`` holds as an attribute (MESA also as a submodule
    anywhere below it), by attribute name or module path."""
    found: dict[str, Term] = {
        name: value for name, value in vars(module).items() if isinstance(value, SAF)
    }
    found.update({name: m for name, m in module.named_modules() if isinstance(m, MESA)})
    return found


class FlatminCallback(pl.Callback):
    """Drive the module's SAF and MESA and check the Trainer against the SAM family.

    .. test: skip="a part of examples/lightning_sam.py, which tests/examples runs"

    Example::

        trainer = pl.Trainer(max_epochs=10, callbacks=[FlatminCallback()])
        trainer.fit(module)      # module.saf = SAF(...), module.mesa = MESA(module.net)

    The module adds the terms to its loss itself (``saf(logits, idx)``,
    ``mesa(x, logits)``); the callback does the bookkeeping around them.
    """

    def __init__(self) -> None:
        self._module: pl.LightningModule | None = None
        self._terms: dict[str, Term] = {}
        self._pending: dict[str, Any] | None = None
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        return "flatmin.FlatminCallback"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module  # Lightning's state_dict() call passes no module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_trainer(trainer)
        terms = _saved_by_callback(pl_module)
        if self._pending is not None:
            # Applied here, after the precision plugin converted the module, so that a
            # float64 or bfloat16 run does not pass its state through float32.
            missing = sorted(set(self._pending) - set(terms))
            if missing:
                raise ValueError(
                    f"the checkpoint holds the state of {missing}, which the LightningModule "
                    f"does not have (it has {sorted(terms) or 'no SAF'}): build the module "
                    "with the same SAF attributes before resuming"
                )
            for name, state in self._pending.items():
                terms[name].load_state_dict(state)
            self._pending = None
        self._terms = trajectory_terms(pl_module)  # found once, not at every batch
        for term in self._terms.values():
            if isinstance(term, MESA):
                _warn_if_the_average_stalls(term)
        self._last_step = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for term in self._terms.values():
            term.set_epoch(trainer.current_epoch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step (accumulating)
            return
        self._last_step = trainer.global_step
        for term in self._terms.values():
            if isinstance(term, MESA) and term.updates_teacher:
                term.update()

    def state_dict(self) -> dict[str, Any]:
        if self._module is None:
            return {}
        return {name: term.state_dict() for name, term in _saved_by_callback(self._module).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)


def _saved_by_callback(module: pl.LightningModule) -> dict[str, SAF]:
    """The terms whose state the module's own state dict does not hold: SAF's."""
    return {name: t for name, t in trajectory_terms(module).items() if isinstance(t, SAF)}


def _warn_if_the_average_stalls(mesa: MESA) -> None:
    ema = mesa.ema
    teacher = next(mesa.teacher.parameters(), None)
    if ema is None or teacher is None or not teacher.is_floating_point():
        return
    step = 1.0 - ema.decay
    if step < torch.finfo(teacher.dtype).eps:
        warnings.warn(
            f"MESA's EMA step 1 - decay = {step:g} is below the resolution of its "
            f"{teacher.dtype} teacher, which will barely move: train in float32 (e.g. "
            "precision='bf16-mixed' instead of 'bf16-true') or use a smaller decay",
            RuntimeWarning,
            stacklevel=2,
        )


def check_trainer(trainer: pl.Trainer) -> None:
    """Raise a ValueError naming the fix if the Trainer's settings would train a
    SAM-family optimizer wrongly (see the module docstring)."""
    sams = [o for o in trainer.optimizers if isinstance(o, SAM)]
    if not sams:
        return
    automatic = trainer.lightning_module.automatic_optimization
    if automatic and trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} with a SAM-family "
            "optimizer trains wrongly (its second pass would see the last micro-batch only): "
            "use manual optimization and run every micro-batch inside the closure of "
            "opt.step(closure=...); see flatmin.integrations.lightning"
        )
    plugin = trainer.precision_plugin
    if getattr(plugin, "scaler", None) is not None and not isinstance(plugin, SAMPrecision):
        raise ValueError(
            f"the precision plugin {type(plugin).__name__} steps the optimizer through a "
            "GradScaler with optimizer.step() and no closure, which a SAM-family optimizer "
            "cannot run: pass plugins=[flatmin.integrations.lightning.SAMPrecision("
            "'16-mixed', device)] or use precision='bf16-mixed'"
        )
    clip = trainer.gradient_clip_val
    exact = [o for o in sams if not o.uses_clean_gradient and o.normalize]
    if automatic and clip and len(exact) < len(sams):
        raise ValueError(
            f"gradient_clip_val={clip} clips the first-pass gradient too, which changes the "
            "update of this optimizer (it uses that gradient, or normalize=False): leave "
            "gradient_clip_val unset and pass max_grad_norm to the optimizer, which clips "
            "the final direction"
        )


class SAMPrecision(MixedPrecision):
    """``precision="16-mixed"`` with a GradScaler, for SAM-family optimizers.

    Lightning's closure scales each loss; the optimizer runs it twice and unscales once
    (``optimizer.step(closure, grad_scaler=scaler)``), then the scaler is updated. A
    non-finite gradient in either pass skips the step with weights and optimizer state
    untouched. Other optimizers are stepped as by ``MixedPrecision``. Gradient clipping
    and ``on_before_optimizer_step`` are not run between the passes: clip with the
    optimizer's ``max_grad_norm``.

    .. test: skip="a part of examples/lightning_sam.py, which tests/examples runs"

    Example::

        trainer = pl.Trainer(plugins=[SAMPrecision("16-mixed", "cuda")])
    """

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Any, **kwargs: Any
    ) -> Any:
        if self.scaler is None or not isinstance(optimizer, SAM):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        output = optimizer.step(closure=closure, grad_scaler=self.scaler, **kwargs)
        self.scaler.update()
        return output


__all__ = ["FlatminCallback", "SAMPrecision", "check_trainer", "trajectory_terms"]
