"""The base optimizer: a class, or any callable that builds one over SAM's parameters."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from flatmin import SAM
from tests.optim.helpers import FAMILY, batches, bn_net, same, snapshot, train

NESTEROV = functools.partial(torch.optim.SGD, nesterov=True)  # timm's get_optimizer_class("sgd")


def _trained(base, seed=0, **kw):
    model = bn_net(seed)
    opt = SAM(model.parameters(), base, rho=0.05, lr=0.05, momentum=0.9, **kw)
    train(model, opt, batches(3))
    return model, opt


@pytest.mark.parametrize(
    "base",
    [
        NESTEROV,
        lambda groups, **kw: torch.optim.SGD(groups, nesterov=True, **kw),
        # A factory that builds its own group dicts, as timm's create_optimizer_v2 may.
        lambda groups, **kw: torch.optim.SGD(
            [{"params": list(g["params"])} for g in groups], nesterov=True, **kw
        ),
    ],
    ids=["partial", "factory", "factory_own_groups"],
)
def test_callable_base_trains_like_the_class(base):
    reference, ref_opt = _trained(torch.optim.SGD, nesterov=True)
    model, opt = _trained(base)
    assert type(opt.base_optimizer) is torch.optim.SGD
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert {k: opt.param_groups[0][k] for k in ("rho", "adaptive", "eta", "nesterov")} == {
        "rho": 0.05,
        "adaptive": None,
        "eta": None,
        "nesterov": True,
    }
    assert same(snapshot(model), snapshot(reference))
    assert opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]


def test_groups_built_by_a_factory_get_the_adaptive_defaults():
    model = nn.Linear(3, 2)
    opt = SAM(
        model.parameters(),
        lambda groups, **kw: torch.optim.SGD([{"params": g["params"]} for g in groups], **kw),
        rho=0.5,
        adaptive="weights",
        lr=0.1,
    )
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["eta"]) == (0.5, 0.01)


@pytest.mark.parametrize("name", FAMILY)
def test_every_member_takes_a_partial(name):
    model = bn_net()
    opt = FAMILY[name](model.parameters(), NESTEROV, lr=0.05, momentum=0.9)
    assert opt.param_groups[0]["nesterov"] is True
    before = snapshot(model)
    train(model, opt, batches(2))
    assert not same(snapshot(model), before)


class TestRefusals:
    def test_not_callable(self):
        with pytest.raises(
            TypeError, match=r"optimizer class such as torch\.optim\.SGD .* callable"
        ):
            SAM(nn.Linear(2, 2).parameters(), 42, lr=0.1)

    def test_a_sam_class_as_its_own_base(self):
        with pytest.raises(TypeError, match="itself a SAM-family optimizer"):
            SAM(nn.Linear(2, 2).parameters(), SAM, lr=0.1)

    def test_a_class_that_is_not_an_optimizer(self):
        with pytest.raises(TypeError, match=r"not a torch\.optim\.Optimizer"):
            SAM(nn.Linear(2, 2).parameters(), nn.Linear, lr=0.1)

    def test_factory_returning_something_else(self):
        with pytest.raises(TypeError, match=r"returned str, expected a torch\.optim\.Optimizer"):
            SAM(nn.Linear(2, 2).parameters(), lambda groups, **kw: "sgd", lr=0.1)

    def test_factory_returning_a_sam_family_optimizer(self):
        def nested(groups, **kw):
            return SAM(groups, torch.optim.SGD, **kw)

        with pytest.raises(TypeError, match="returned a SAM, a SAM-family optimizer"):
            SAM(nn.Linear(2, 2).parameters(), nested, lr=0.1)

    def test_factory_over_other_parameters(self):
        other = nn.Linear(2, 2)
        with pytest.raises(ValueError, match="not the 2 given to SAM"):
            SAM(
                nn.Linear(2, 2).parameters(),
                lambda groups, **kw: torch.optim.SGD(other.parameters(), **kw),
                lr=0.1,
            )

    def test_factory_over_a_subset_of_the_parameters(self):
        net = nn.Linear(2, 2)
        with pytest.raises(ValueError, match="over 1 parameter tensors that are not the 2"):
            SAM(net.parameters(), lambda groups, **kw: torch.optim.SGD([net.weight], **kw), lr=0.1)
