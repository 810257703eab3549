"""accelerate with the SAM family (row 6 of issue 15's table): prepare + closure step,
accumulation refused and its recipe, save_state/load_state, mixed precision."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from flatmin import MESA, SAM
from tests.helpers import assert_trees_equal
from tests.integrations.helpers import (
    SAM_SETTINGS,
    assert_same_training,
    batches,
    make_net,
    parameters,
    readme_accumulation,
    readme_loop,
    weights,
)

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from flatmin.integrations.accelerate import sam_step  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons (a second Accelerator with other settings
    is refused, and flatmin reads the accumulation setting): each test starts from none
    and leaves none."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def prepared(accelerator, mesa=False, seed=0):
    net = make_net(seed)
    opt = SAM(net.parameters(), torch.optim.SGD, model=net, **SAM_SETTINGS)
    net, opt = accelerator.prepare(net, opt)
    term = None
    if mesa:
        term = MESA(net, decay=0.5, lam=1.0, start_epoch=0)
        term.set_epoch(1)
        accelerator.register_for_checkpointing(term)
    return net, opt, term


def train(accelerator, net, opt, data, micro=1, term=None):
    for x, y in data:

        def closure(x=x, y=y):
            total = 0.0
            chunks = list(zip(x.chunk(micro), y.chunk(micro)))
            for j, (xm, ym) in enumerate(chunks):
                last = j == len(chunks) - 1
                with torch.enable_grad() if last else accelerator.no_sync(net):
                    logits = net(xm)
                    loss = F.cross_entropy(logits, ym) / micro
                    if term is not None:
                        loss = loss + term(xm, logits)
                    accelerator.backward(loss)
                total += loss.detach()
            return total

        opt.zero_grad()
        sam_step(accelerator, opt, closure)
        if term is not None:
            term.update()


def test_prepare_and_closure_step_equal_the_readme_loop():
    accelerator = accelerate.Accelerator(cpu=True)
    net, opt, _ = prepared(accelerator)
    train(accelerator, net, opt, batches())
    assert_same_training(net, readme_loop()[0])


def test_the_prepared_optimizer_s_own_step_is_the_same_step():
    accelerator = accelerate.Accelerator(cpu=True)
    net, opt, _ = prepared(accelerator)
    for x, y in batches():
        opt.zero_grad()
        opt.step(lambda x=x, y=y: (l := F.cross_entropy(net(x), y), accelerator.backward(l))[0])
    assert_same_training(net, readme_loop()[0])


def test_accumulate_is_refused_before_anything_moves():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net, opt, _ = prepared(accelerator)
    before = parameters(net)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2\).*one closure"):
        for x, y in batches():
            with accelerator.accumulate(net):
                opt.step(
                    lambda x=x, y=y: (l := F.cross_entropy(net(x), y), accelerator.backward(l))[0]
                )
    assert_trees_equal(parameters(net), before)


def test_the_accumulation_recipe_equals_the_readme_recipe():
    accelerator = accelerate.Accelerator(cpu=True)
    net, opt, _ = prepared(accelerator)
    train(accelerator, net, opt, batches(32), micro=2)
    assert_same_training(net, readme_accumulation(micro=2))


def test_save_state_and_load_state_resume_bit_exactly(tmp_path):
    data = batches()
    accelerator = accelerate.Accelerator(cpu=True)
    net, opt, term = prepared(accelerator, mesa=True)
    train(accelerator, net, opt, data, term=term)
    straight, teacher = weights(net), weights(term)
    AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(cpu=True)
    net, opt, term = prepared(accelerator, mesa=True)
    train(accelerator, net, opt, data[:2], term=term)
    accelerator.save_state(tmp_path / "state")
    AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(cpu=True)
    net, opt, term = prepared(accelerator, mesa=True, seed=1)  # all from the checkpoint
    accelerator.load_state(tmp_path / "state")
    train(accelerator, net, opt, data[2:], term=term)
    assert_trees_equal(weights(net), straight)
    assert_trees_equal(weights(term), teacher)


def test_bf16_mixed_precision_trains_close_to_float32():
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    net, opt, _ = prepared(accelerator)
    train(accelerator, net, opt, batches())
    reference = readme_loop()[0]
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(net.state_dict()[key], value, rtol=0.05, atol=0.02)
    assert not torch.equal(net.state_dict()["0.weight"], reference.state_dict()["0.weight"])


@pytest.mark.parametrize("init_scale", [2.0**10, 1e38], ids=["finite", "overflow"])
def test_a_grad_scaler_unscales_once_and_skips_an_overflow(init_scale):
    """accelerate's GradScaler as a GPU fp16 run holds it (forced: none on a CPU)."""
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    net, opt, _ = prepared(accelerator)
    before = parameters(net)
    train(accelerator, net, opt, batches())
    if init_scale == 1e38:  # every step overflows: nothing moves, the scale backs off
        assert_trees_equal(parameters(net), before)
        assert accelerator.scaler.get_scale() < 1e37
        return
    reference = make_net()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, model=reference, **SAM_SETTINGS)
    for x, y in batches():
        ref_opt.step(
            lambda x=x, y=y: scaler.scale(F.cross_entropy(reference(x), y)).backward(),
            grad_scaler=scaler,
        )
        scaler.update()
    assert_same_training(net, reference)
