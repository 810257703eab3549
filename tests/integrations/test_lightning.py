"""Lightning with the SAM family, SAF and MESA, against the README's own loops.

Rows 1–5 of issue 15's table: automatic optimization (BatchNorm, logged loss),
accumulate_grad_batches, manual optimization, 16-mixed with a GradScaler, and SAF/MESA
in a LightningModule (driving, bit-exact resume, 64-true / bf16-true).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch.nn import functional as F

from flatmin import MESA, SAF, SAM, LookSAM, StableSAM
from flatmin.optim.bn import running_stats_frozen
from tests.helpers import assert_trees_equal
from tests.integrations.helpers import (
    SAM_SETTINGS,
    N,
    assert_same_training,
    loader,
    make_net,
    parameters,
    readme_accumulation,
    readme_loop,
    readme_scaled_loop,
    weights,
)

pl = pytest.importorskip("pytorch_lightning")
from flatmin.integrations import lightning  # noqa: E402  (after the framework's check)

for _name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]


def trainer(**kw) -> pl.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**settings, **kw})


class Automatic(pl.LightningModule):
    """The documented automatic-optimization pattern: log in the first pass only."""

    def __init__(self, optimizer=SAM, **kw):
        super().__init__()
        self.net = make_net()
        self.optimizer, self.kw = optimizer, kw
        self.first_pass_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if not self.optimizers().is_perturbed:
            self.first_pass_losses.append(float(loss.detach()))
            self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        settings = {**SAM_SETTINGS, **self.kw}
        return self.optimizer(self.net.parameters(), torch.optim.SGD, model=self.net, **settings)


class Manual(pl.LightningModule):
    """Manual optimization: opt.step(closure=...) over ``micro`` micro-batches, or the
    README's explicit passes on the optimizer Lightning hands out."""

    def __init__(self, explicit=False, micro=1, optimizer=SAM, **kw):
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net()
        self.explicit, self.micro, self.optimizer, self.kw = explicit, micro, optimizer, kw

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.explicit:
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            opt.first_step(zero_grad=True)
            if opt.is_perturbed:
                with running_stats_frozen(self.net):
                    self.manual_backward(F.cross_entropy(self.net(x), y))
                opt.second_step(zero_grad=True)
            return loss

        def closure():
            total = 0.0
            for xm, ym in zip(x.chunk(self.micro), y.chunk(self.micro)):
                loss = F.cross_entropy(self.net(xm), ym) / self.micro
                self.manual_backward(loss)
                total += loss.detach()
            return total

        opt.zero_grad()
        return opt.step(closure=closure)

    def configure_optimizers(self):
        settings = {**SAM_SETTINGS, **self.kw}
        return self.optimizer(self.net.parameters(), torch.optim.SGD, model=self.net, **settings)


# -- row 1: automatic optimization ----------------------------------------------------------


def test_automatic_optimization_equals_the_readme_loop_and_logs_the_first_pass():
    module = Automatic()
    fit = trainer(callbacks=[lightning.FlatminCallback()])
    fit.fit(module, loader())
    reference, losses = readme_loop()
    assert_same_training(module.net, reference)
    assert module.first_pass_losses == pytest.approx(losses, abs=1e-6)
    assert float(fit.callback_metrics["train_loss"]) == pytest.approx(sum(losses) / 4, abs=1e-6)


# -- row 2: accumulate_grad_batches -----------------------------------------------------------


def test_accumulate_grad_batches_is_refused_at_fit_start():
    module = Automatic()
    before = weights(module.net)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2 .* manual optimization"):
        trainer(accumulate_grad_batches=2, callbacks=[lightning.FlatminCallback()]).fit(
            module, loader()
        )
    assert_trees_equal(weights(module.net), before)


def test_accumulate_grad_batches_without_the_callback_is_refused_at_the_first_step():
    module = Automatic()
    before = parameters(module.net)
    with pytest.raises(ValueError, match="accumulation done outside its closure"):
        trainer(accumulate_grad_batches=2).fit(module, loader())
    assert_trees_equal(parameters(module.net), before)


def test_manual_accumulation_recipe_equals_the_readme_recipe():
    module = Manual(micro=2)
    fit = trainer()
    fit.fit(module, loader(batch_size=32))  # each loader batch = 2 micro-batches of 16
    assert fit.global_step == 2
    assert_same_training(module.net, readme_accumulation(micro=2))


# -- row 3: manual optimization ---------------------------------------------------------------


def test_manual_closure_step_equals_the_readme_loop_and_counts_steps():
    module = Manual()
    fit = trainer()
    fit.fit(module, loader())
    assert fit.global_step == 4
    assert_same_training(module.net, readme_loop()[0])


@pytest.mark.parametrize("optimizer, kw", [(SAM, {}), (LookSAM, {"k": 2})], ids=["sam", "looksam"])
def test_manual_explicit_passes_on_lightning_s_optimizer_equal_the_readme_loop(optimizer, kw):
    module = Manual(explicit=True, optimizer=optimizer, **kw)
    trainer().fit(module, loader())
    assert_same_training(module.net, readme_loop(optimizer=optimizer, **kw)[0])
    if optimizer is LookSAM:  # its step counter lives on the real optimizer
        assert module.optimizers().optimizer.steps_done == 4


# -- row 4: 16-mixed with a GradScaler --------------------------------------------------------


def _fp16_plugin(cls):
    return cls("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))


def test_sam_precision_equals_the_readme_loop_with_a_grad_scaler():
    module = Automatic()
    plugin = _fp16_plugin(lightning.SAMPrecision)
    trainer(plugins=[plugin], callbacks=[lightning.FlatminCallback()]).fit(module, loader())
    reference = readme_scaled_loop(torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert_same_training(module.net, reference)
    assert plugin.scaler.get_scale() == 2.0**12


def test_sam_precision_in_manual_optimization_equals_the_readme_loop_with_a_grad_scaler():
    module = Manual()
    plugin = _fp16_plugin(lightning.SAMPrecision)
    trainer(plugins=[plugin]).fit(module, loader())
    reference = readme_scaled_loop(torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert_same_training(module.net, reference)


def test_stock_mixed_precision_plugin_is_refused_clearly():
    from pytorch_lightning.plugins import MixedPrecision

    module = Automatic()
    with pytest.raises(ValueError, match="SAMPrecision"):
        trainer(
            plugins=[_fp16_plugin(MixedPrecision)], callbacks=[lightning.FlatminCallback()]
        ).fit(module, loader())
    module = Automatic()
    before = parameters(module.net)
    with pytest.raises(ValueError, match=r"needs a closure .*SAMPrecision"):
        trainer(plugins=[_fp16_plugin(MixedPrecision)]).fit(module, loader())
    assert_trees_equal(parameters(module.net), before)


def test_gradient_clip_val_with_a_clean_gradient_member_is_refused():
    module = Automatic(optimizer=StableSAM)
    with pytest.raises(ValueError, match=r"gradient_clip_val=1\.0 .* max_grad_norm"):
        trainer(gradient_clip_val=1.0, callbacks=[lightning.FlatminCallback()]).fit(
            module, loader()
        )


# -- row 5: SAF and MESA in a LightningModule -------------------------------------------------


class WithTerms(pl.LightningModule):
    def __init__(self, kind, decay=0.5):
        super().__init__()
        self.net = make_net()
        if kind == "saf":
            self.saf = SAF(N, 3, lam=1.0, lag_epochs=1, start_epoch=0, store_dtype=torch.float32)
        else:
            self.mesa = MESA(self.net, decay=decay, lam=1.0, start_epoch=0)
        self.kind = kind
        self.terms = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self.net(x)
        term = self.saf(logits, idx) if self.kind == "saf" else self.mesa(x, logits)
        if not self.optimizers().is_perturbed:
            self.terms.append((self.current_epoch, float(term.detach())))
        return F.cross_entropy(logits, y) + term

    def configure_optimizers(self):
        return SAM(self.net.parameters(), torch.optim.SGD, model=self.net, **SAM_SETTINGS)


def _fit_terms(kind, epochs, tmp_path, precision="32-true", resume=None, save=None, **kw):
    fit = trainer(max_epochs=epochs, precision=precision, callbacks=[lightning.FlatminCallback()])
    with fit.init_module():  # the module is built in the run's dtype (64-true)
        module = WithTerms(kind, **kw)
    fit.fit(module, loader(with_index=True), ckpt_path=resume)
    if save:
        fit.save_checkpoint(tmp_path / save)
    return module


@pytest.mark.parametrize("kind", ["saf", "mesa"])
def test_resume_from_a_lightning_checkpoint_is_bit_exact(kind, tmp_path):
    straight = _fit_terms(kind, 3, tmp_path)
    _fit_terms(kind, 2, tmp_path, save="two.ckpt")
    resumed = _fit_terms(kind, 3, tmp_path, resume=tmp_path / "two.ckpt")
    assert_trees_equal(weights(resumed), weights(straight))
    last_epoch = [(e, v) for e, v in straight.terms if e == 2]
    assert [(e, v) for e, v in resumed.terms if e == 2] == last_epoch
    assert any(v > 0 for _, v in last_epoch)  # the term was active, from the restored state


def test_the_callback_drives_set_epoch_and_mesa_update():
    module = _fit_terms("mesa", 2, None)
    assert module.mesa.epoch == 1
    assert module.mesa.ema.num_updates == 8  # one per optimizer step


def test_mesa_follows_64_true_and_warns_when_bf16_true_stalls_its_average():
    module = _fit_terms("mesa", 1, None, precision="64-true")
    assert {p.dtype for p in module.mesa.teacher.parameters()} == {torch.float64}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _fit_terms("mesa", 1, None, precision="bf16-true", decay=0.9998)
    assert {p.dtype for p in module.mesa.teacher.parameters()} == {torch.bfloat16}
    assert any("below the resolution" in str(w.message) for w in caught)
