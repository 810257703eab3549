import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import flatmin
from flatmin.trajectory import EMA, MESA
from flatmin.trajectory.fold import FoldedForward
from tests.helpers import assert_resumes_bit_exactly
from tests.trajectory.helpers import (
    bn_cnn,
    bn_mlp,
    move_student,
    numpy_tempered_kl,
    plain_eval_forward,
)


def test_public_name_is_this_class():
    assert flatmin.MESA is MESA


def test_update_takes_one_ema_step_of_the_student_parameters_and_buffers():
    model = bn_mlp(dtype=torch.float64)
    mesa = MESA(model, decay=0.75)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    move_student(model, torch.randn(8, 4, dtype=torch.float64))
    mesa.update()
    for name, value in mesa.teacher.state_dict().items():
        student = model.state_dict()[name]
        if value.is_floating_point():
            expected = 0.75 * before[name] + 0.25 * student
            torch.testing.assert_close(value, expected, rtol=1e-15, atol=1e-15)
        else:  # num_batches_tracked is copied
            assert torch.equal(value, student), name
    assert mesa.ema.num_updates == 1


def test_teacher_gets_no_gradients_and_never_changes_the_student():
    model = bn_mlp()
    mesa = MESA(model, start_epoch=0)
    mesa.set_epoch(1)
    move_student(model, torch.randn(8, 4))
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
    model = bn_mlp(dtype=torch.float64)
    mesa = MESA(model, lam=0.8, tau=5.0, start_epoch=0)
    move_student(model, torch.randn(8, 4, dtype=torch.float64))
    mesa.update()
    mesa.set_epoch(1)
    x = torch.randn(8, 4, dtype=torch.float64)
    logits = model(x)
    teacher_logits = plain_eval_forward(mesa.teacher, x)
    expected = 0.8 * numpy_tempered_kl(logits.detach().numpy(), teacher_logits.numpy(), 5.0)
    assert math.isclose(mesa(x, logits).item(), expected, rel_tol=1e-12)


def test_zero_before_start_without_running_the_teacher():
    model = bn_mlp()
    mesa = MESA(model, start_epoch=2)
    calls = []
    mesa.teacher.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(4, 4)
    for epoch in range(3):
        mesa.set_epoch(epoch)
        term = mesa(x, model(x))
        assert term.item() == 0.0 and term.requires_grad
        mesa.update()
    assert calls == []
    mesa.set_epoch(3)
    mesa(x, model(x))
    assert calls == [1]


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match=r"student model as an nn\.Module"):
        MESA(object())
    with pytest.raises(ValueError, match=r"decay must be a finite number >= 0\.0 and <= 1\.0"):
        MESA(bn_mlp(), decay=1.5)
    with pytest.raises(ValueError, match="decay must be a finite number"):
        MESA(bn_mlp(), decay=float("nan"))
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0\.0, got -1"):
        MESA(bn_mlp(), tau=-1)
    with pytest.raises(TypeError, match="start_epoch must be an integer"):
        MESA(bn_mlp(), start_epoch="5")
    with pytest.raises(ValueError, match="teacher_memory_format must be one of"):
        MESA(bn_cnn(), teacher_memory_format="channels_last")
    mesa = MESA(bn_mlp(), start_epoch=0)
    mesa.set_epoch(1)
    with pytest.raises(ValueError, match=r"student's shape \(4, 2\)"):
        mesa(torch.randn(4, 4), torch.randn(4, 2))


def _parts(seed):
    torch.manual_seed(seed)
    model = bn_mlp()
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        "mesa": MESA(model, decay=0.9, start_epoch=0, warmup=True),
    }


def _train(parts, epochs, x, y):
    model, opt, mesa = parts["model"], parts["optimizer"], parts["mesa"]
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
    straight = assert_resumes_bit_exactly(
        _parts,
        lambda parts, epochs: _train(parts, epochs, x, y),
        epochs=4,
        stop_after=2,
        checkpoint=tmp_path / "checkpoint.pt",
    )
    assert straight["mesa"].ema.num_updates == 16
    assert straight["mesa"].epoch == 3


class _Parent(nn.Module):
    """A LightningModule-like owner of the student and its MESA term."""

    def __init__(self) -> None:
        super().__init__()
        self.model = bn_mlp()
        self.mesa = MESA(self.model, decay=0.5, start_epoch=0)


def test_mesa_is_a_module_whose_only_submodule_is_the_teacher():
    parent = _Parent()
    mesa = parent.mesa
    assert [name for name, _ in mesa.named_children()] == ["ema"]
    assert mesa.model is parent.model and mesa.teacher is mesa.ema.module
    assert list(mesa.parameters()) == list(mesa.teacher.parameters())  # not the student's
    keys = list(parent.state_dict())
    assert [k for k in keys if k.startswith("model.")] == [
        f"model.{k}" for k in mesa.model.state_dict()
    ]
    assert "mesa.ema.module.0.weight" in keys and "mesa._extra_state" in keys
    assert "mesa.ema._extra_state" in keys

    move_student(parent.model, torch.randn(8, 4))
    mesa.update()
    mesa.set_epoch(2)
    other = _Parent()
    other.load_state_dict(parent.state_dict())
    for name, value in mesa.teacher.state_dict().items():
        assert torch.equal(other.mesa.teacher.state_dict()[name], value), name
    assert other.mesa.epoch == 2 and other.mesa.ema.num_updates == 1

    parent.double()  # the teacher follows the parent's dtype (and device)
    assert mesa.teacher[0].weight.dtype == torch.float64
    parent.train()
    assert mesa.model.training and not mesa.teacher.training
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(mesa.teacher_logits(x), plain_eval_forward(mesa.teacher, x))


def test_load_state_dict_checks_everything_before_changing_anything():
    mesa = MESA(bn_mlp(), decay=0.5, start_epoch=0)
    move_student(mesa.model, torch.randn(8, 4))
    mesa.update()
    before = {k: v.clone() for k, v in mesa.teacher.state_dict().items()}

    def unchanged():
        state = mesa.teacher.state_dict()
        return all(torch.equal(state[k], v) for k, v in before.items()) and mesa.epoch == 0

    other = MESA(bn_mlp(), start_epoch=3).state_dict()
    other["ema.module.0.weight"] = torch.zeros(6, 5)  # the wrong shape, listed after others
    with pytest.raises(ValueError, match=re.escape("expected ema.module.0.weight of shape (6, 4)")):
        mesa.load_state_dict(other)
    assert unchanged()
    missing = MESA(bn_mlp()).state_dict()
    del missing["_extra_state"]
    with pytest.raises(ValueError, match=re.escape("missing ['_extra_state']")):
        mesa.load_state_dict(missing)
    assert unchanged()
    broken = MESA(bn_mlp()).state_dict()
    broken["_extra_state"] = {"epoch": 2}
    with pytest.raises(ValueError, match=r"_extra_state to be a dict with keys \['epoch', 'lam'"):
        mesa.load_state_dict(broken)
    assert unchanged()
    parent = _Parent()  # through a parent module, torch loads and MESA checks its part
    state = parent.state_dict()
    state["mesa._extra_state"] = {"epoch": 2}
    with pytest.raises(ValueError, match=r"hold \['lam', 'start_epoch', 'tau'\] too"):
        _Parent().load_state_dict(state)
    old_layout = {"teacher": mesa.teacher.state_dict(), "num_updates": 1, "epoch": 0}
    with pytest.raises(ValueError, match="unexpected \\['epoch', 'num_updates', 'teacher'\\]"):
        mesa.load_state_dict(old_layout)
    assert unchanged()


def test_channels_last_teacher_keeps_values_and_gives_the_same_term():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    plain = MESA(model, start_epoch=0, teacher_memory_format=None)
    channels_last = MESA(model, start_epoch=0, teacher_memory_format=torch.channels_last)
    assert channels_last.teacher[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.teacher[0].weight.is_contiguous()
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


@pytest.mark.parametrize("memory_format", ["auto", None, torch.channels_last])
def test_folded_teacher_equals_the_plain_eval_forward_after_every_update(memory_format):
    torch.manual_seed(0)
    model = bn_cnn()
    mesa = MESA(model, decay=0.5, start_epoch=0, teacher_memory_format=memory_format)
    assert isinstance(mesa._fast, FoldedForward)
    x = torch.randn(5, 3, 8, 8)
    for _ in range(3):
        move_student(model, x)
        mesa.update()
        torch.testing.assert_close(
            mesa.teacher_logits(x), plain_eval_forward(mesa.teacher, x), rtol=1e-5, atol=1e-6
        )


def test_auto_memory_format_is_channels_last_for_a_built_cpu_cnn_only():
    assert MESA(bn_cnn()).teacher_memory_format == torch.channels_last
    assert MESA(bn_cnn()).teacher[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert MESA(bn_mlp()).teacher_memory_format is None
    assert MESA(bn_cnn(), teacher_memory_format=None).teacher[0].weight.is_contiguous()
    model = bn_cnn()
    ema = EMA(model)
    assert MESA(model, teacher=ema).teacher_memory_format is None  # yours: left as it is
    assert ema.module[0].weight.is_contiguous()


def test_folding_leaves_the_ema_state_and_the_term_unchanged():
    torch.manual_seed(0)
    model = bn_cnn()
    folded = MESA(model, decay=0.5, start_epoch=0)
    plain = MESA(model, decay=0.5, start_epoch=0, fold_batchnorm=False)
    assert plain._fast is None
    x = torch.randn(5, 3, 8, 8)
    for _ in range(2):
        move_student(model, x)
        folded.update()
        plain.update()
        logits = model.eval()(x)
        torch.testing.assert_close(folded(x, logits), plain(x, logits), rtol=1e-5, atol=1e-7)
    assert folded.state_dict().keys() == plain.state_dict().keys()
    for a, b in zip(folded.teacher.state_dict().values(), plain.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_a_teacher_converted_to_another_dtype_is_folded_again():
    torch.manual_seed(0)
    mesa = MESA(bn_cnn(), start_epoch=0)
    x = torch.randn(5, 3, 8, 8)
    mesa.teacher_logits(x)
    mesa.double()
    fast = mesa.teacher_logits(x.double())
    assert fast.dtype == torch.float64
    torch.testing.assert_close(
        fast, plain_eval_forward(mesa.teacher, x.double()), rtol=1e-12, atol=0
    )


def test_memory_counts_the_built_teacher_and_the_folded_weights():
    model = bn_cnn()
    floats = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) - 4
    teacher_bytes = 4 * floats + 8 * 4  # and the four BatchNorms' int64 num_batches_tracked
    folded_bytes = 4 * ((4 * 27 + 4) + (16 + 4) + (6 * 64 + 6))  # see test_fold
    assert MESA(model).memory_bytes == teacher_bytes + folded_bytes
    assert MESA(model, fold_batchnorm=False).memory_bytes == teacher_bytes
    assert MESA(model, teacher=EMA(model)).memory_bytes == folded_bytes  # the copy is yours
    assert MESA(model, teacher=EMA(model), fold_batchnorm=False).memory_bytes == 0


@pytest.mark.parametrize("kind", ["flatmin", "torch"])
def test_an_ema_you_keep_is_the_teacher_without_a_second_copy(kind):
    torch.manual_seed(0)
    model = bn_cnn()
    if kind == "flatmin":
        ema = EMA(model, decay=0.5)
        step = lambda: ema.update(model)  # noqa: E731
    else:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
        step = lambda: ema.update_parameters(model)  # noqa: E731
    mesa = MESA(model, start_epoch=0, teacher=ema)
    assert mesa.teacher is ema.module and not mesa.updates_teacher
    assert list(mesa.children()) == [] and list(mesa.state_dict()) == ["_extra_state"]
    with pytest.raises(RuntimeError, match=r"update that EMA .*ema\.update\(model\)"):
        mesa.update()
    mesa.set_epoch(1)
    x = torch.randn(5, 3, 8, 8)
    for _ in range(2):  # the owner's updates reach the (folded) teacher forward
        move_student(model, x)
        step()
        torch.testing.assert_close(
            mesa.teacher_logits(x), plain_eval_forward(ema.module, x), rtol=1e-5, atol=1e-6
        )


def test_a_given_teacher_refuses_the_settings_of_the_ema_mesa_would_build():
    model = bn_mlp()
    with pytest.raises(ValueError, match="decay and warmup set the EMA that MESA builds"):
        MESA(model, decay=0.99, teacher=EMA(model))
    with pytest.raises(ValueError, match="decay and warmup"):
        MESA(model, warmup=True, teacher=EMA(model))
    with pytest.raises(ValueError, match="not model itself"):
        MESA(model, teacher=model)
    with pytest.raises(TypeError, match=r"EMA holding the averaged network as \.module"):
        MESA(model, teacher="ema.pt")
    plain_network = bn_mlp()  # an averaged network kept without a wrapper
    assert MESA(model, teacher=plain_network).teacher is plain_network


def _loop(mesa, epochs, update, x):
    for epoch in epochs:
        mesa.set_epoch(epoch)
        for _ in range(3):
            mesa(x, mesa.model(x))
            if update:
                mesa.update()


def test_never_calling_update_warns_once_at_the_next_epoch_naming_it():
    x = torch.randn(4, 4)
    mesa = MESA(bn_mlp(), start_epoch=5)
    with pytest.warns(RuntimeWarning) as caught:
        _loop(mesa, range(4), update=False, x=x)  # the term is not active yet: still wrong
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "MESA: mesa(inputs, logits) was called 3 times in epoch 0 but mesa.update() not once, "
        "so the EMA teacher did not move: call mesa.update() after every optimizer step"
    )
    stuck = MESA(bn_mlp(), start_epoch=0)  # the last epoch: the checkpoint tells
    stuck.set_epoch(1)
    stuck(x, stuck.model(x))
    with pytest.warns(RuntimeWarning, match=r"called 1 times in epoch 1 .*mesa\.update\(\)"):
        stuck.state_dict()


def test_no_update_warning_when_update_follows_the_steps_or_the_teacher_is_yours():
    x = torch.randn(4, 4)
    model = bn_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mesa = MESA(model, start_epoch=0)
        _loop(mesa, range(3), update=True, x=x)
        mesa.state_dict()
        yours = MESA(model, start_epoch=0, teacher=EMA(model))
        _loop(yours, range(3), update=False, x=x)
        yours.state_dict()
        idle = MESA(model)  # built but never called: nothing to warn about
        for epoch in range(3):
            idle.set_epoch(epoch)
