"""transformers' Trainer with the SAM family, SAF and MESA (row 7 of issue 15's table).

Models are built locally (no download): the BatchNorm network of the other framework
tests behind a transformers-style forward, and a one-layer BERT from a config.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from flatmin import MESA, SAF, SAM, LookSAM, StableSAM
from tests.helpers import assert_trees_equal
from tests.integrations.helpers import (
    SAM_SETTINGS,
    assert_same_training,
    make_data,
    make_net,
    parameters,
    readme_accumulation,
    readme_loop,
    weights,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from flatmin.integrations.transformers import FlatminTrainer, LogitsOf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class Classifier(nn.Module):
    """make_net() with a transformers-style forward: a dict in, a ModelOutput out."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Items(Dataset):
    def __init__(self, with_index=False):
        self.x, self.y = make_data()
        self.with_index = with_index

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = {"x": self.x[i], "labels": self.y[i]}
        if self.with_index:
            item["idx"] = torch.tensor(i)
        return item


def arguments(out, **kw):
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=16,
        num_train_epochs=1,
        learning_rate=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
    )
    return transformers.TrainingArguments(**{**settings, **kw})


def sam_for(model, optimizer=SAM, **kw):
    return optimizer(model.parameters(), torch.optim.SGD, model=model, **{**SAM_SETTINGS, **kw})


def test_trainer_equals_the_readme_loop_with_batchnorm(tmp_path):
    model = Classifier()
    FlatminTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=Items(),
        optimizers=(sam_for(model), None),
    ).train()
    assert_same_training(model.net, readme_loop()[0])


def test_gradient_accumulation_equals_the_readme_recipe(tmp_path):
    model = Classifier()
    trainer = FlatminTrainer(
        model=model,
        args=arguments(tmp_path, gradient_accumulation_steps=2),
        train_dataset=Items(),
        optimizers=(sam_for(model), None),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert_same_training(model.net, readme_accumulation(micro=2))


def test_looksam_reuse_steps_equal_the_readme_loop(tmp_path):
    model = Classifier()
    opt = sam_for(model, LookSAM, k=2)
    FlatminTrainer(
        model=model, args=arguments(tmp_path), train_dataset=Items(), optimizers=(opt, None)
    ).train()
    assert opt.steps_done == 4
    assert_same_training(model.net, readme_loop(optimizer=LookSAM, k=2)[0])


def test_a_grad_scaler_unscales_once_and_skips_an_overflow(tmp_path):
    """A GradScaler as a GPU fp16 run gets it (forced here: accelerate makes none on CPU)."""
    runs = {}
    for init_scale in (2.0**10, 1e38):
        model = Classifier()
        before = parameters(model)
        trainer = FlatminTrainer(
            model=model,
            args=arguments(tmp_path),
            train_dataset=Items(),
            optimizers=(sam_for(model), None),
        )
        # The scaler alone (native_amp stays off): a float32 forward, scaled backward passes.
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        trainer.train()
        runs[init_scale] = (model, before, trainer)
    model, _, trainer = runs[2.0**10]
    reference = make_net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = SAM(reference.parameters(), torch.optim.SGD, model=reference, **SAM_SETTINGS)
    x, y = make_data()
    for xb, yb in zip(x.split(16), y.split(16)):
        opt.step(lambda xb=xb, yb=yb: scaler.scale(F.cross_entropy(reference(xb), yb)).backward(),
                 grad_scaler=scaler)  # fmt: skip
        scaler.update()
    assert_same_training(model.net, reference)
    model, before, trainer = runs[1e38]  # every step overflows: nothing moves
    assert_trees_equal(parameters(model), before)
    assert not trainer.sam.is_perturbed


def test_max_grad_norm_with_a_clean_gradient_member_is_refused(tmp_path):
    model = Classifier()
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0\) clips the surrogate gradient"):
        FlatminTrainer(
            model=model,
            args=arguments(tmp_path, max_grad_norm=1.0),
            train_dataset=Items(),
            optimizers=(sam_for(model, StableSAM), None),
        )


def test_a_tiny_bert_built_locally_trains_as_the_plain_loop(tmp_path):
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids, labels = (
        torch.randint(0, 50, (32, 8), generator=g),
        torch.randint(0, 3, (32,), generator=g),
    )
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(transformers.BertForSequenceClassification(config))
    bert, reference = models
    FlatminTrainer(
        model=bert, args=arguments(tmp_path), train_dataset=data, optimizers=(sam_for(bert), None)
    ).train()
    opt = sam_for(reference)
    for i in range(0, 32, 16):
        batch = {"input_ids": ids[i : i + 16], "labels": labels[i : i + 16]}
        opt.step(lambda batch=batch: (loss := reference(**batch).loss).backward() or loss)
    for (name, p), q in zip(bert.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def _run_terms(kind, epochs, out, resume=None):
    model = Classifier()
    if kind == "saf":
        terms = {"saf": SAF(64, 3, lam=1.0, lag_epochs=1, start_epoch=0, store_dtype=torch.float32)}
    else:
        terms = {"mesa": MESA(LogitsOf(model), decay=0.5, lam=1.0, start_epoch=0)}
    trainer = FlatminTrainer(
        model=model,
        args=arguments(
            out, num_train_epochs=epochs, save_strategy="epoch", remove_unused_columns=False
        ),
        train_dataset=Items(with_index=True),
        optimizers=(sam_for(model), None),
        **terms,
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, next(iter(terms.values()))


@pytest.mark.parametrize("kind", ["saf", "mesa"])
def test_terms_resume_bit_exactly_from_the_trainer_s_checkpoint(kind, tmp_path):
    straight, term = _run_terms(kind, 3, tmp_path / "straight")
    _run_terms(kind, 2, tmp_path / "parts")
    resumed, resumed_term = _run_terms(kind, 3, tmp_path / "parts", resume=True)
    assert term.active and resumed_term.epoch == 2
    assert_trees_equal(weights(resumed), weights(straight))
    assert_trees_equal(resumed_term.state_dict(), term.state_dict())


def test_saf_needs_the_index_column(tmp_path):
    model = Classifier()
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        FlatminTrainer(
            model=model, args=arguments(tmp_path), train_dataset=Items(with_index=True),
            saf=SAF(64, 3),
        )  # fmt: skip
