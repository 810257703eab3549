import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import flatmin
from flatmin.trajectory import MESA


def _model(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


def _student_moves(model: nn.Module) -> None:
    """Replace weights by fresh random values and run a train-mode forward (BN stats)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        model.train()(torch.randn(8, 4, dtype=next(model.parameters()).dtype))


def test_public_name_is_this_class():
    assert flatmin.MESA is MESA


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_recurrence_of_parameters_and_buffers(warmup):
    model = _model(torch.float64)
    decay = 0.9
    mesa = MESA(model, decay=decay, warmup=warmup)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # v_0 = θ_0
    for t in range(1, 6):
        _student_moves(model)
        beta = min(decay, (1 + t) / (10 + t)) if warmup else decay
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = beta * expected[name] + (1 - beta) * value
            else:
                expected[name] = value.clone()
        mesa.update()
        for name, value in mesa.teacher.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-14)
    teacher_bn = mesa.teacher[1]
    assert not torch.equal(teacher_bn.running_mean, torch.zeros(6))  # BN buffers averaged
    assert teacher_bn.num_batches_tracked.item() == model[1].num_batches_tracked.item() == 5


def test_warmup_decay_form():
    mesa = MESA(_model(), decay=0.99, warmup=True)
    seen = []
    for _ in range(1000):
        seen.append(mesa.current_decay())
        mesa.num_updates += 1
    assert seen[0] == 2 / 11  # t = 1
    assert seen[9] == 11 / 20  # t = 10
    assert seen[888] < 0.99 and seen[889] == 0.99  # (1 + t)/(10 + t) reaches 0.99 at t = 890
    assert MESA(_model(), decay=0.99).current_decay() == 0.99


def test_teacher_is_an_independent_copy_on_the_models_device_and_dtype():
    model = _model(torch.float64)
    mesa = MESA(model)
    for mine, theirs in zip(mesa.teacher.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        assert mine.dtype == theirs.dtype and mine.device == theirs.device
        assert mine.data_ptr() != theirs.data_ptr()
        assert not mine.requires_grad
    assert not mesa.teacher.training


def test_teacher_gets_no_gradients_and_never_changes_the_student():
    model = _model()
    mesa = MESA(model, start_epoch=0)
    mesa.set_epoch(1)
    _student_moves(model)
    mesa.update()
    teacher_before = {k: v.clone() for k, v in mesa.teacher.state_dict().items()}
    x = torch.randn(8, 4)
    logits = model(x)
    student_before = {k: v.clone() for k, v in model.state_dict().items()}
    term = mesa(x, logits)
    assert term.item() > 0
    (F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)) + term).backward()
    assert all(p.grad is None for p in mesa.teacher.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, student_before[name]), name
    for name, value in mesa.teacher.state_dict().items():  # eval mode: no BN update
        assert torch.equal(value, teacher_before[name]), name
    assert model.training and not mesa.teacher.training


def test_term_is_the_tempered_kl_against_the_eval_mode_teacher():
    model = _model(torch.float64)
    mesa = MESA(model, lam=0.8, tau=5.0, start_epoch=0)
    _student_moves(model)
    mesa.update()
    mesa.set_epoch(1)
    x = torch.randn(8, 4, dtype=torch.float64)
    logits = model(x)
    with torch.no_grad():
        teacher_logits = mesa.teacher(x)
    p = torch.softmax(teacher_logits / 5, 1)
    expected = 0.8 * 25 * (p * (p.log() - torch.log_softmax(logits / 5, 1))).sum(1).mean()
    assert math.isclose(mesa(x, logits).item(), expected.item(), rel_tol=1e-12)


def test_zero_before_start_without_running_the_teacher():
    model = _model()
    mesa = MESA(model, start_epoch=2)
    calls = []
    mesa.teacher.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(4, 4)
    for epoch in range(3):
        mesa.set_epoch(epoch)
        term = mesa(x, model(x))
        assert term.item() == 0.0 and term.requires_grad
    assert calls == []
    mesa.set_epoch(3)
    mesa(x, model(x))
    assert calls == [1]


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        MESA(object())
    with pytest.raises(ValueError, match="decay"):
        MESA(_model(), decay=1.5)
    mesa = MESA(_model(), start_epoch=0)
    mesa.set_epoch(1)
    with pytest.raises(ValueError, match=r"student's shape \(4, 2\)"):
        mesa(torch.randn(4, 4), torch.randn(4, 2))


def _fresh(seed):
    torch.manual_seed(seed)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mesa = MESA(model, decay=0.9, start_epoch=0, warmup=True)
    return model, opt, mesa


def _train(model, opt, mesa, epochs, x, y):
    for epoch in epochs:
        mesa.set_epoch(epoch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(4):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + mesa(x[idx], logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mesa.update()


def test_resume_is_bit_exact(tmp_path):
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model, opt, mesa = _fresh(0)
    _train(model, opt, mesa, range(4), x, y)

    first = _fresh(0)
    _train(*first, range(2), x, y)
    torch.save(
        {name: part.state_dict() for name, part in zip(("m", "o", "e"), first, strict=True)},
        tmp_path / "ckpt.pt",
    )
    resumed = _fresh(1)
    state = torch.load(tmp_path / "ckpt.pt")
    for name, part in zip(("m", "o", "e"), resumed, strict=True):
        part.load_state_dict(state[name])
    _train(*resumed, range(2, 4), x, y)

    for mine, theirs in zip(model.state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(mine, theirs)
    teacher, teacher_resumed = mesa.teacher.state_dict(), resumed[2].teacher.state_dict()
    for name, value in teacher.items():
        assert torch.equal(value, teacher_resumed[name]), name
    assert mesa.num_updates == resumed[2].num_updates == 16


def test_channels_last_teacher_keeps_values_and_gives_the_same_term():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    plain = MESA(model, start_epoch=0)
    channels_last = MESA(model, start_epoch=0, teacher_memory_format=torch.channels_last)
    assert channels_last.teacher[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous()  # the student is untouched
    x = torch.randn(5, 3, 8, 8)
    model(x)  # move the student's BN statistics
    for mesa in (plain, channels_last):
        mesa.update()
        mesa.set_epoch(1)
    for a, b in zip(
        plain.teacher.state_dict().values(), channels_last.teacher.state_dict().values()
    ):
        assert torch.equal(a, b)
    logits = model(x)
    torch.testing.assert_close(channels_last(x, logits), plain(x, logits))
