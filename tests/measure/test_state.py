"""The measuring context: measuring mode inside, bit-exact restoration outside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatmin.measure import (
    gaussian_noise_curve,
    hessian_eigenvalues,
    hessian_trace,
    loss_landscape,
    sam_sharpness,
)
from flatmin.measure._state import measuring, trainable_parameters
from tests.measure.helpers import Snapshot, make_data, make_mlp


def _mixed_mode_model() -> nn.Module:
    model = make_mlp(batch_norm=True, dropout=True)
    model.train()
    model[-1].eval()  # one submodule in a different mode than its parent
    return model


def test_inside_eval_mode_everywhere_by_default():
    model = _mixed_mode_model()
    with measuring(model):
        assert not any(m.training for m in model.modules())


def test_train_mode_bn_puts_only_batchnorm_in_train_mode():
    model = _mixed_mode_model()
    with measuring(model, train_mode_bn=True):
        modes = {type(m).__name__: m.training for m in model.modules()}
    assert modes["BatchNorm1d"] is True
    assert modes["Dropout"] is False
    assert modes["Sequential"] is False


def test_everything_restored_bit_for_bit_after_an_exception():
    model = _mixed_mode_model()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[-1].bias.requires_grad_(False)
    snapshot = Snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), measuring(model, train_mode_bn=True):
        model(torch.randn(8, 4, dtype=torch.float64))  # moves the BN running stats
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        model[0].weight.grad = None
        model[0].weight.requires_grad_(False)
        raise RuntimeError("boom")
    snapshot.assert_unchanged()


def test_tied_parameters_are_restored_once_and_correctly():
    shared = nn.Linear(3, 3).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    before = shared.weight.detach().clone()
    with measuring(model), torch.no_grad():
        shared.weight.add_(1.0)
    assert torch.equal(shared.weight, before)


def test_rejects_non_module():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"), measuring(object()):
        pass


def test_trainable_parameters_skips_frozen_and_rejects_all_frozen():
    model = nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    assert [name for name, _ in trainable_parameters(model)] == ["weight"]
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        trainable_parameters(model)


# --- the guarantee, checked through every public measure function -----------------

MEASURES = {
    "sam_sharpness": lambda model, loss_fn, data, bn: sam_sharpness(
        model, loss_fn, data, rho=0.1, m=8, steps=2, train_mode_bn=bn
    ),
    "hessian_eigenvalues": lambda model, loss_fn, data, bn: hessian_eigenvalues(
        model, loss_fn, data, k=2, max_iter=5, train_mode_bn=bn
    ),
    "hessian_trace": lambda model, loss_fn, data, bn: hessian_trace(
        model, loss_fn, data, num_queries=6, train_mode_bn=bn
    ),
    "loss_landscape": lambda model, loss_fn, data, bn: loss_landscape(
        model, loss_fn, data, dims=2, steps=3, train_mode_bn=bn
    ),
    "gaussian_noise_curve": lambda model, loss_fn, data, bn: gaussian_noise_curve(
        model, loss_fn, data, scales=[0.0, 0.1], repeats=2, train_mode_bn=bn
    ),
}


def _model_with_state_to_lose() -> nn.Module:
    model = _mixed_mode_model()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    model[0].bias.requires_grad_(False)
    return model


class _FailingLoss:
    """Cross-entropy that raises on its ``fail_on``-th call."""

    def __init__(self, fail_on: int) -> None:
        self.fail_on = fail_on
        self.calls = 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected failure")
        return F.cross_entropy(output, target)


@pytest.mark.parametrize("train_mode_bn", [False, True], ids=["eval", "train_bn"])
@pytest.mark.parametrize("name", list(MEASURES))
def test_model_and_global_rng_unchanged_after_each_measure(name, train_mode_bn):
    model = _model_with_state_to_lose()
    snapshot = Snapshot(model)
    rng = torch.get_rng_state()
    MEASURES[name](model, F.cross_entropy, make_data(), train_mode_bn)
    snapshot.assert_unchanged()
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("fail_on", [2, 4])
@pytest.mark.parametrize("name", list(MEASURES))
def test_model_unchanged_when_the_loss_raises_midway(name, fail_on):
    model = _model_with_state_to_lose()
    snapshot = Snapshot(model)
    loss_fn = _FailingLoss(fail_on)
    with pytest.raises(RuntimeError, match="injected failure"):
        MEASURES[name](model, loss_fn, make_data(), True)
    assert loss_fn.calls == fail_on
    snapshot.assert_unchanged()
