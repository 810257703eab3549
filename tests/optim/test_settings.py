"""optim/_settings.py: the SAM family's settings refused with a clear error — ρ, the
adaptive form and η in the constructor, in its groups, in added groups and in loaded state
dicts — before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatmin import ASAM, SAM
from tests.optim.helpers import state_equal


class TestBadInput:
    def test_negative_rho(self):
        with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
            SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)

    def test_negative_rho_in_added_group_leaves_groups_alone(self):
        opt = SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
        with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
            opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "rho": -1})
        assert len(opt.param_groups) == 1

    @pytest.mark.parametrize("rho", [float("nan"), float("inf"), -0.5])
    def test_bad_rho_in_a_constructor_group(self, rho):
        net = nn.Linear(2, 2)
        groups = [{"params": [net.weight]}, {"params": [net.bias], "rho": rho}]
        with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
            SAM(groups, torch.optim.SGD, lr=0.1)

    @pytest.mark.parametrize("rho", [float("nan"), float("inf")])
    def test_non_finite_rho(self, rho):
        with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
            SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, rho=rho, lr=0.1)

    @pytest.mark.parametrize("where", ["constructor", "group", "added group"])
    def test_nan_eta(self, where):
        net = nn.Linear(2, 2)
        kw = dict(adaptive="weights", lr=0.1)
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            if where == "constructor":
                SAM(net.parameters(), torch.optim.SGD, eta=float("nan"), **kw)
            elif where == "group":
                SAM([{"params": net.parameters(), "eta": float("nan")}], torch.optim.SGD, **kw)
            else:
                opt = SAM([net.weight], torch.optim.SGD, **kw)
                opt.add_param_group({"params": [net.bias], "eta": float("nan")})

    @pytest.mark.parametrize("where", ["group", "added group", "group beside an adaptive one"])
    def test_a_group_eta_without_an_adaptive_form_is_refused(self, where):
        net = nn.Linear(2, 2)
        lone = {"params": [net.bias], "eta": 0.5}
        with pytest.raises(ValueError, match=r"a param group has eta=0.5.* no adaptive form"):
            if where == "group":
                SAM([{"params": net.parameters(), "eta": 0.5}], torch.optim.SGD, lr=0.1)
            elif where == "added group":
                SAM([net.weight], torch.optim.SGD, lr=0.1).add_param_group(lone)
            else:
                adaptive = {"params": [net.weight], "adaptive": "weights"}
                SAM([adaptive, lone], torch.optim.SGD, lr=0.1)

    def test_a_group_eta_with_the_constructor_s_adaptive_form_is_used(self):
        net = nn.Linear(2, 2)
        opt = SAM([{"params": net.parameters(), "eta": 0.5}], torch.optim.SGD,
                  adaptive="all", lr=0.1)  # fmt: skip
        assert opt.param_groups[0]["eta"] == 0.5

    def test_eta_without_an_adaptive_form(self):
        with pytest.raises(ValueError, match=r"eta=0.5 is ASAM's η .* no effect"):
            SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, eta=0.5, lr=0.1)

    def test_stable_cap_without_stable(self):
        with pytest.raises(ValueError, match=r"stable_cap=True .* stable=True"):
            SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, stable_cap=True, lr=0.1)

    @pytest.mark.parametrize("adaptive", [True, False])
    def test_bool_adaptive_names_the_forms(self, adaptive):
        with pytest.raises(ValueError, match=r"adaptive='weights' .* adaptive='all'"):
            SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, adaptive=adaptive, lr=0.1)

    def test_asam_without_an_adaptive_form(self):
        with pytest.raises(ValueError, match="ASAM needs an adaptive form"):
            ASAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, adaptive=None, lr=0.1)

    def test_empty_parameter_list(self):
        with pytest.raises(ValueError, match=r"model\.parameters\(\)"):
            SAM([], torch.optim.SGD, lr=0.1)

    def test_base_optimizer_instance_instead_of_class(self):
        net = nn.Linear(2, 2)
        with pytest.raises(TypeError, match=r"optimizer class such as torch\.optim\.SGD"):
            SAM(net.parameters(), torch.optim.SGD(net.parameters(), lr=0.1))

    def test_unknown_adaptive_form(self):
        with pytest.raises(ValueError, match="adaptive must be one of"):
            SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, adaptive="yes", lr=0.1)

    def test_step_without_closure(self):
        opt = SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
        with pytest.raises(ValueError, match="needs a closure"):
            opt.step()

    def test_second_step_without_first(self):
        opt = SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
        with pytest.raises(RuntimeError, match="needs a first_step"):
            opt.second_step()

    def test_first_step_twice_leaves_weights_at_the_first_perturbation(self):
        net = nn.Linear(2, 2)
        before = [p.detach().clone() for p in net.parameters()]
        opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
        net(torch.ones(1, 2)).sum().backward()
        opt.first_step()
        perturbed = [p.detach().clone() for p in net.parameters()]
        with pytest.raises(RuntimeError, match="called twice"):
            opt.first_step()
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), perturbed))
        opt.restore_weights()
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))

    def test_load_state_dict_of_wrong_kind(self):
        net = nn.Linear(2, 2)
        opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        with pytest.raises(ValueError, match=r"its param groups lack \['rho', 'adaptive', 'eta'\]"):
            opt.load_state_dict(torch.optim.SGD(net.parameters(), lr=0.1).state_dict())

    def test_load_state_dict_of_the_earlier_layout_changes_nothing(self):
        net = nn.Linear(2, 2)
        opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        opt.step(lambda: (loss := net(torch.ones(1, 2)).sum()).backward() or loss)
        before = copy.deepcopy(opt.state_dict())
        earlier = {"base_optimizer": opt.base_optimizer.state_dict(), "method": {}}
        with pytest.raises(ValueError, match=r"layout \{'base_optimizer', 'method'\}"):
            opt.load_state_dict(earlier)
        assert state_equal(opt.state_dict(), before)

    @pytest.mark.parametrize("rho", [float("nan"), -1.0])
    def test_load_state_dict_with_a_bad_rho_changes_nothing(self, rho):
        net = nn.Linear(2, 2)
        opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        saved = opt.state_dict()
        saved["param_groups"][0]["rho"] = rho
        with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
            opt.load_state_dict(saved)
        assert opt.param_groups[0]["rho"] == 0.05
