import pytest
import torch
from torch import nn

from flatmin.trajectory import EMA
from tests.trajectory.helpers import bn_mlp


def _student_moves(model: nn.Module) -> None:
    """Replace weights by fresh random values and run a train-mode forward (BN stats)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        model.train()(torch.randn(8, 4, dtype=next(model.parameters()).dtype))


@pytest.mark.parametrize("warmup", [False, True])
def test_recurrence_of_parameters_and_buffers(warmup):
    model = bn_mlp(dtype=torch.float64)
    decay = 0.9
    ema = EMA(model, decay=decay, warmup=warmup)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # v_0 = θ_0
    for t in range(1, 6):
        _student_moves(model)
        beta = min(decay, (1 + t) / (10 + t)) if warmup else decay
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = beta * expected[name] + (1 - beta) * value
            else:
                expected[name] = value.clone()
        ema.update(model)
        for name, value in ema.module.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-14)
    bn = ema.module[1]
    assert not torch.equal(bn.running_mean, torch.zeros(6))  # BN buffers averaged
    assert bn.num_batches_tracked.item() == model[1].num_batches_tracked.item() == 5
    assert ema.num_updates == 5


def test_warmup_decay_form():
    ema = EMA(bn_mlp(), decay=0.99, warmup=True)
    seen = []
    for _ in range(1000):
        seen.append(ema.current_decay())
        ema.num_updates += 1
    assert seen[0] == 2 / 11  # t = 1
    assert seen[9] == 11 / 20  # t = 10
    assert seen[888] < 0.99 and seen[889] == 0.99  # (1 + t)/(10 + t) reaches 0.99 at t = 890
    assert EMA(bn_mlp(), decay=0.99).current_decay() == 0.99


def test_the_average_is_an_independent_copy_on_the_models_device_and_dtype():
    model = bn_mlp(dtype=torch.float64)
    ema = EMA(model)
    for mine, theirs in zip(ema.module.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        assert mine.dtype == theirs.dtype and mine.device == theirs.device
        assert mine.data_ptr() != theirs.data_ptr()
        assert not mine.requires_grad
    assert not ema.module.training


def test_is_a_module_a_parent_casts_saves_and_loads():
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bn_mlp()
            self.ema = EMA(self.model, decay=0.5, warmup=True)

    parent = Parent()
    _student_moves(parent.model)
    parent.ema.update(parent.model)
    state = parent.state_dict()
    assert "ema.module.0.weight" in state and "ema.module.1.running_var" in state
    assert state["ema._extra_state"] == {"num_updates": 1, "decay": 0.5, "warmup": True}

    other = Parent()
    other.load_state_dict(state)
    for name, value in parent.ema.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(other.ema.state_dict()[name], value), name
    assert other.ema.num_updates == 1

    parent.double()  # dtype casts reach the average
    assert parent.ema.module[0].weight.dtype == torch.float64
    parent.train()  # ... mode changes do not: the average always runs in eval mode
    assert parent.ema.training and not parent.ema.module.training
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(parent.ema(x), parent.ema.module(x))


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match=r"expected an nn\.Module to average, got object"):
        EMA(object())
    with pytest.raises(ValueError, match=r"decay must be a finite number >= 0\.0 and <= 1\.0"):
        EMA(bn_mlp(), decay=1.5)
    ema = EMA(bn_mlp())
    with pytest.raises(ValueError, match=r"missing \['warmup'\]"):
        ema.set_extra_state({"num_updates": 3, "decay": 0.9})
    assert ema.num_updates == 0 and ema.decay == 0.9998


def test_a_model_of_other_shapes_is_refused_before_the_average_moves():
    ema = EMA(nn.Linear(4, 3))
    before = [t.clone() for t in ema.module.parameters()]
    with pytest.raises(ValueError, match=r"shape \(3, 4\) where the model has \(3, 5\)"):
        ema.update(nn.Linear(5, 3))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))
    assert ema.num_updates == 0
