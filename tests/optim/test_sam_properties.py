"""Property tests: exact restore and ρ = 0 ≡ base optimizer, over random shapes and groups."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flatmin import SAM

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
)
adaptive_forms = st.sampled_from([None, "weights", "all"])


def build(shape_list, n_groups, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shape_list]
    groups = [{"params": params[i::n_groups]} for i in range(n_groups) if params[i::n_groups]]
    return params, groups


def loss_of(params, scale=1.0):
    return sum((p.sin() * scale).sum() + (p**2).sum() for p in params)


@settings(max_examples=40, deadline=None)
@given(
    shape_list=shapes,
    n_groups=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    adaptive=adaptive_forms,
    rho=st.floats(0.0, 5.0),
    stable=st.booleans(),
)
def test_perturbed_weights_come_back_exactly(shape_list, n_groups, seed, adaptive, rho, stable):
    params, groups = build(shape_list, n_groups, seed)
    before = [p.detach().clone() for p in params]
    opt = SAM(groups, torch.optim.SGD, rho=rho, adaptive=adaptive, stable=stable, lr=0.0)
    loss_of(params).backward()
    opt.first_step(zero_grad=True)
    loss_of(params[: (len(params) + 1) // 2], scale=3.0).backward()  # the rest get none
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(params, before))

    loss_of(params).backward()
    opt.first_step(zero_grad=True)
    opt.restore_weights()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@settings(max_examples=30, deadline=None)
@given(
    shape_list=shapes,
    n_groups=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    adaptive=adaptive_forms,
    base=st.sampled_from(["sgd", "adamw"]),
    stable=st.booleans(),
)
def test_rho_zero_is_the_base_optimizer_bit_for_bit(
    shape_list, n_groups, seed, adaptive, base, stable
):
    cls, kw = {
        "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
    }[base]
    params_a, groups_a = build(shape_list, n_groups, seed)
    params_b, groups_b = build(shape_list, n_groups, seed)
    sam = SAM(groups_a, cls, rho=0.0, adaptive=adaptive, stable=stable, **kw)
    plain = cls(groups_b, **kw)
    for _ in range(3):
        sam.zero_grad()
        sam.step(lambda: (loss := loss_of(params_a)).backward() or loss)
        plain.zero_grad()
        loss_of(params_b).backward()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b))
