"""SAM, ASAM, USAM and StableSAM against closed forms on L(w) = ½ wᵀAw, and their API."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from flatmin import ASAM, SAM, StableSAM
from flatmin.optim._buckets import is_adaptive_weight
from tests.optim.helpers import (
    DT,
    LR,
    Quadratic,
    expected_step,
    flat,
    grad_at,
    make_problem,
    one_step,
)


def test_sam_perturbation_and_update_match_closed_form():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR)
    one_step(opt, model)
    g = grad_at(A, v)
    eps = 0.05 * g / g.norm()
    torch.testing.assert_close(flat(model), expected_step(A, v, eps), rtol=0, atol=1e-14)


def test_first_step_moves_to_w_plus_eps_exactly_as_closed_form():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=LR)
    model().backward()
    opt.first_step(zero_grad=True)
    g = grad_at(A, v)
    torch.testing.assert_close(flat(model), v + 0.3 * g / g.norm(), rtol=0, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())
    model().backward()
    opt.second_step()
    assert not opt.is_perturbed


def test_asam_official_form_scales_weights_not_biases():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    eta, rho = 0.01, 0.5
    opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=rho, eta=eta, lr=LR)
    one_step(opt, model)
    g = grad_at(A, v)
    T = torch.cat([w.abs() + eta, torch.ones_like(b)])
    eps = rho * T * T * g / (T * g).norm()
    torch.testing.assert_close(flat(model), expected_step(A, v, eps), rtol=0, atol=1e-14)


class TinyViT(nn.Module):
    """A class token, position embeddings, attention with a relative-position bias table
    and a LayerScale ``gamma``: the parameter names the ASAM name rule must get right."""

    def __init__(self, dim=8, heads=2, tokens=3):
        super().__init__()
        length = tokens + 1
        self.patch = nn.Linear(4, dim)
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, length, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn(2 * length - 1, heads))
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, 3)
        offsets = torch.arange(length)
        self.register_buffer("relative_index", offsets[:, None] - offsets[None, :] + length - 1)

    def forward(self, x):
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch(x)], 1)
        tokens = tokens + self.pos_embed
        bias = self.relative_position_bias_table[self.relative_index].permute(2, 0, 1)
        h = self.norm(tokens)
        attended, _ = self.attn(h, h, h, attn_mask=bias.repeat(len(x), 1, 1), need_weights=False)
        return self.head((tokens + self.gamma * attended)[:, 0])


def official_asam_step(model, x, y, rho, eta, lr):
    """One ASAM step as Kwon et al. (ICML 2021) define it, with the official code's name
    rule: ``T = |w| + η`` on parameters whose name contains 'weight', 1 on the others;
    ``ε = ρ T²g/‖Tg‖``; plain SGD with ``∇L(w + ε)``."""
    names, params = zip(*model.named_parameters())
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    g = torch.autograd.grad(loss(), params)
    T = [
        p.detach().abs() + eta if "weight" in n else torch.ones_like(p)
        for n, p in zip(names, params)
    ]
    norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(T, g)))
    w = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t, gi in zip(params, T, g):
            p.add_(rho * t * t * gi / norm)
    g_s = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        for p, wi, gi in zip(params, w, g_s):
            p.copy_(wi - lr * gi)


def test_asam_follows_the_official_name_rule_on_a_transformer_block():
    torch.manual_seed(0)
    ours = TinyViT().double()
    official = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    opt = ASAM(ours.named_parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: (loss := nn.functional.cross_entropy(ours(x), y)).backward() or loss)
        official_asam_step(official, x, y, rho=0.5, eta=0.01, lr=0.1)
    for (name, p), q in zip(ours.named_parameters(), official.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13, msg=name)
    scaled = {n for n, p in ours.named_parameters() if is_adaptive_weight(p, n)}
    assert scaled == {
        "patch.weight",
        "norm.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    }


def test_asam_without_names_scales_tensors_of_two_or_more_dims():
    w, b, A = make_problem(weight_shape=(2, 3))
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=LR)
    one_step(opt, model)
    g = grad_at(A, v)
    T = torch.cat([w.reshape(-1).abs() + 0.01, torch.ones_like(b)])
    eps = 0.5 * T * T * g / (T * g).norm()
    torch.testing.assert_close(flat(model), expected_step(A, v, eps), rtol=0, atol=1e-14)


def test_asam_all_parameter_form_of_the_popular_port():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, adaptive="all", eta=0.0, lr=LR)
    one_step(opt, model)
    g = grad_at(A, v)
    T = v.abs()
    eps = 2.0 * T * T * g / (T * g).norm()
    torch.testing.assert_close(flat(model), expected_step(A, v, eps), rtol=0, atol=1e-14)


@pytest.mark.parametrize("adaptive", ["weights", "all"])
def test_eta_is_applied_in_both_adaptive_forms(adaptive):
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = SAM(model.named_parameters(), torch.optim.SGD, rho=1.0, adaptive=adaptive, eta=0.5, lr=LR)
    one_step(opt, model)
    g = grad_at(A, v)
    T = v.abs() + 0.5 if adaptive == "all" else torch.cat([w.abs() + 0.5, torch.ones_like(b)])
    eps = 1.0 * T * T * g / (T * g).norm()
    torch.testing.assert_close(flat(model), expected_step(A, v, eps), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("adaptive", "eta"), [("weights", 0.01), ("all", 0.0)])
def test_eta_defaults_to_each_form_s_own(adaptive, eta):
    w, b, A = make_problem()
    opt = SAM(Quadratic(w, b, A).parameters(), torch.optim.SGD, adaptive=adaptive, lr=LR)
    assert opt.param_groups[0]["eta"] == eta


def test_usam_is_unnormalized():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, normalize=False, lr=LR)
    one_step(opt, model)
    eps = 0.05 * grad_at(A, v)
    torch.testing.assert_close(flat(model), expected_step(A, v, eps), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cap", [False, True])
@pytest.mark.parametrize("rho", [0.05, 3.0])
def test_stablesam_renormalizes_to_the_clean_gradient_norm(cap, rho):
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = StableSAM(model.parameters(), torch.optim.SGD, rho=rho, stable_cap=cap, lr=LR)
    one_step(opt, model)
    g = grad_at(A, v)
    eps = rho * g / g.norm()
    gamma = g.norm() / grad_at(A, v + eps).norm()
    if cap:
        gamma = min(gamma, torch.tensor(1.0, dtype=DT))
    torch.testing.assert_close(flat(model), expected_step(A, v, eps, gamma), rtol=0, atol=1e-14)


def test_stable_asam_uses_weighted_norms():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    opt = SAM(
        model.named_parameters(), torch.optim.SGD, rho=0.5, adaptive="weights", stable=True, lr=LR
    )
    one_step(opt, model)
    g = grad_at(A, v)
    T = torch.cat([w.abs() + 0.01, torch.ones_like(b)])
    eps = 0.5 * T * T * g / (T * g).norm()
    gamma = (T * g).norm() / (T * grad_at(A, v + eps)).norm()
    torch.testing.assert_close(flat(model), expected_step(A, v, eps, gamma), rtol=0, atol=1e-14)


def test_stable_asam_leaves_a_constant_gradient_unscaled():
    """With a linear loss g_s = g: both norms are taken with the T of w, so γ = 1 and the
    step is the plain one (T of w + ε for ‖T g_s‖, the authors' choice, would give
    γ = ‖T(w)g‖/‖T(w+ε)g‖ ≠ 1)."""
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(5, generator=g, dtype=DT))
    c = torch.randn(5, generator=g, dtype=DT)
    opt = SAM([weight], torch.optim.SGD, rho=0.5, adaptive="all", stable=True, lr=LR)
    start = weight.detach().clone()
    opt.step(lambda: (loss := c @ weight).backward() or loss)
    torch.testing.assert_close(weight.detach(), start - LR * c, rtol=0, atol=1e-15)
    T, eps = start.abs(), 0.5 * start.abs() ** 2 * c / (start.abs() * c).norm()
    authors_gamma = (T * c).norm() / ((start + eps).abs() * c).norm()
    assert abs(authors_gamma - 1) > 0.1


def test_per_group_rho_uses_the_global_norm():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    v = flat(model)
    groups = [{"params": [model.weight], "rho": 0.2}, {"params": [model.bias], "rho": 0.0}]
    opt = SAM(groups, torch.optim.SGD, rho=0.05, lr=LR)
    model().backward()
    opt.first_step(zero_grad=True)
    g = grad_at(A, v)
    eps = g / g.norm() * torch.cat([torch.full_like(w, 0.2), torch.zeros_like(b)])
    torch.testing.assert_close(flat(model), v + eps, rtol=0, atol=1e-14)
    opt.restore_weights()


def test_zero_gradient_gives_zero_perturbation_not_nan():
    w, b, A = make_problem()
    model = Quadratic(torch.zeros_like(w), torch.zeros_like(b), A)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR)
    one_step(opt, model)
    assert torch.equal(flat(model), torch.zeros_like(flat(model)))


def test_clipping_bounds_the_final_gradient():
    w, b, A = make_problem()
    model = Quadratic(10 * w, 10 * b, A)
    v = flat(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, max_grad_norm=0.5)
    one_step(opt, model)
    g = grad_at(A, v)
    g_s = grad_at(A, v + 0.05 * g / g.norm())
    assert g_s.norm() > 0.5
    expected = v - LR * g_s * (0.5 / (g_s.norm() + 1e-6))
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)


def test_gradient_accumulation_equals_the_full_batch_step():
    torch.manual_seed(1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

    def build():
        torch.manual_seed(2)
        net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        return net, SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, momentum=0.9)

    full, opt_full = build()
    for _ in range(3):
        opt_full.zero_grad()
        nn.functional.cross_entropy(full(x), y).backward()
        opt_full.first_step(zero_grad=True)
        nn.functional.cross_entropy(full(x), y).backward()
        opt_full.second_step(zero_grad=True)

    acc, opt_acc = build()
    for _ in range(3):
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (nn.functional.cross_entropy(acc(xs), ys) / 2).backward()
        opt_acc.first_step(zero_grad=True)
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (nn.functional.cross_entropy(acc(xs), ys) / 2).backward()
        opt_acc.second_step(zero_grad=True)
    for p, q in zip(full.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("explicit", [False, True])
def test_lr_scheduler_attached_to_sam_warns_nothing(explicit):
    net = nn.Linear(3, 2)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        for _ in range(3):
            opt.zero_grad()
            if explicit:
                net(x).square().mean().backward()
                opt.first_step(zero_grad=True)
                net(x).square().mean().backward()
                opt.second_step()
            else:
                opt.step(lambda: (loss := net(x).square().mean()).backward() or loss)
            sched.step()
    assert [str(w.message) for w in caught] == []
    expected_lr = 0.05 * (1 + torch.cos(torch.tensor(3 * torch.pi / 4))).item() * 1.0
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)


def test_step_returns_the_first_pass_loss():
    w, b, A = make_problem()
    model = Quadratic(w, b, A)
    first = model().detach()
    loss = one_step(SAM(model.parameters(), torch.optim.SGD, lr=LR), model)
    assert torch.equal(loss.detach(), first)


def test_state_dict_has_torch_layout_and_no_transient_copies():
    net = nn.Linear(3, 2)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.step(lambda: (loss := net(torch.ones(1, 3)).sum()).backward() or loss)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {0, 1}
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    group = sd["param_groups"][0]
    assert (group["rho"], group["adaptive"], group["eta"], group["params"]) == (
        0.05,
        None,
        None,
        [0, 1],
    )
    assert sd == opt.base_optimizer.state_dict()  # nothing of SAM's own beyond the settings
    net(torch.ones(1, 3)).sum().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="after second_step"):
        opt.state_dict()
    opt.restore_weights()
