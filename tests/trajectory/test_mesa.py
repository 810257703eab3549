import copy
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
    with pytest.raises(
        ValueError, match=r"decay must be a finite number >= 0.0 and <= 1.0, got 1.5"
    ):
        MESA(_model(), decay=1.5)
    with pytest.raises(ValueError, match="decay must be a finite number"):
        MESA(_model(), decay=float("nan"))
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0\.0, got -1"):
        MESA(_model(), tau=-1)
    with pytest.raises(TypeError, match="start_epoch must be an integer"):
        MESA(_model(), start_epoch="5")
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


class _Residual(nn.Module):
    """A residual block whose first conv's output also skips its BN (that BN stays)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = nn.Conv2d(4, 4, 1, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(4, affine=False)

    def forward(self, x):
        h = self.conv(x)
        return torch.relu(self.bn(h) + h + self.shortcut_bn(self.shortcut(x)))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        _Residual(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


class _BatchNormCalls(torch.overrides.TorchFunctionMode):
    """Counts the calls of ``F.batch_norm`` made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.batch_norm
        return func(*args, **(kwargs or {}))


def _plain_eval_forward(mesa: MESA, x: torch.Tensor) -> torch.Tensor:
    """An independent forward of the EMA weights: a fresh copy, NCHW, nothing folded."""
    plain = copy.deepcopy(mesa.teacher).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        return plain(x.contiguous())


def _moved_student_and_teacher(model: nn.Module, mesa: MESA, x: torch.Tensor) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.train()(x)  # moves the running statistics
    mesa.update()


@pytest.mark.parametrize("memory_format", ["auto", None, torch.channels_last])
def test_folded_teacher_equals_the_plain_eval_forward_after_every_update(memory_format):
    torch.manual_seed(0)
    model = _cnn()
    mesa = MESA(model, decay=0.5, start_epoch=0, teacher_memory_format=memory_format)
    x = torch.randn(5, 3, 8, 8)
    for _ in range(3):
        _moved_student_and_teacher(model, mesa, x)
        counter = _BatchNormCalls()
        with counter:
            fast = mesa.teacher_logits(x)
        assert counter.calls == 1  # all but the BN whose input is also used elsewhere
        torch.testing.assert_close(fast, _plain_eval_forward(mesa, x), rtol=1e-5, atol=1e-6)


def test_auto_memory_format_is_channels_last_for_a_cpu_cnn_only():
    assert MESA(_cnn()).teacher_memory_format == torch.channels_last
    assert MESA(_cnn()).teacher[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert MESA(_model()).teacher_memory_format is None
    assert MESA(_cnn(), teacher_memory_format=None).teacher[0].weight.is_contiguous()
    with pytest.raises(ValueError, match="teacher_memory_format"):
        MESA(_cnn(), teacher_memory_format="channels_last")


def test_folding_leaves_the_ema_state_and_the_term_unchanged():
    torch.manual_seed(0)
    model = _cnn()
    folded = MESA(model, decay=0.5, start_epoch=0)
    plain = MESA(model, decay=0.5, start_epoch=0, fold_batchnorm=False)
    x = torch.randn(5, 3, 8, 8)
    for _ in range(2):
        _moved_student_and_teacher(model, folded, x)
        plain.update()
        logits = model.eval()(x)
        torch.testing.assert_close(folded(x, logits), plain(x, logits), rtol=1e-5, atol=1e-7)
    assert folded.teacher.state_dict().keys() == plain.teacher.state_dict().keys()
    for a, b in zip(
        folded.teacher.state_dict().values(), plain.teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_folded_weights_follow_in_place_changes_and_loaded_state():
    torch.manual_seed(0)
    model = _cnn()
    mesa = MESA(model, start_epoch=0)
    x = torch.randn(5, 3, 8, 8)
    mesa.teacher_logits(x)
    with torch.no_grad():  # e.g. DistributedMESA broadcasting rank 0's teacher
        mesa.teacher[1].running_var.mul_(4.0)
        mesa.teacher[0].weight.neg_()
    torch.testing.assert_close(
        mesa.teacher_logits(x), _plain_eval_forward(mesa, x), rtol=1e-5, atol=1e-6
    )
    other = MESA(_cnn(), start_epoch=0)
    other.teacher_logits(x)
    other.load_state_dict(mesa.state_dict())
    torch.testing.assert_close(
        other.teacher_logits(x), mesa.teacher_logits(x), rtol=1e-5, atol=1e-6
    )


def test_teacher_converted_to_another_dtype_is_folded_again():
    torch.manual_seed(0)
    mesa = MESA(_cnn(), start_epoch=0)
    x = torch.randn(5, 3, 8, 8)
    mesa.teacher_logits(x)
    mesa.teacher.double()
    fast = mesa.teacher_logits(x.double())
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, _plain_eval_forward(mesa, x.double()), rtol=1e-12, atol=0)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        if x.sum() > 0:  # cannot be traced symbolically
            x = -x
        return self.bn(self.linear(x))


class _Tokens(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d over L: not the linear layer's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.linear(x)).flatten(1)


@pytest.mark.parametrize(("module", "shape"), [(_DataDependent, (6, 4)), (_Tokens, (6, 5, 5))])
def test_teachers_that_cannot_be_folded_run_as_they_are(module, shape):
    torch.manual_seed(0)
    model = module()
    mesa = MESA(model, decay=0.5, start_epoch=0)
    x = torch.randn(*shape)
    _moved_student_and_teacher(model, mesa, x)
    torch.testing.assert_close(
        mesa.teacher_logits(x), _plain_eval_forward(mesa, x), rtol=1e-5, atol=1e-6
    )


def test_memory_counts_the_teacher_and_its_folded_weights():
    model = _cnn()
    floats = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) - 4
    teacher_bytes = 4 * floats + 8 * 4  # and the four BatchNorms' int64 num_batches_tracked
    # Folded: the first conv (4·3·3·3), the residual's 1×1 shortcut (4·4) and the first
    # linear layer (6·64), each with a new bias per output channel (4, 4 and 6).
    folded_bytes = 4 * ((4 * 27 + 4) + (16 + 4) + (6 * 64 + 6))
    assert MESA(model).memory_bytes == teacher_bytes + folded_bytes
    assert MESA(model, fold_batchnorm=False).memory_bytes == teacher_bytes


class _SharedPreActivation(nn.Module):
    """A folded conv whose output feeds the ReLU *and* the sum: the ReLU must stay out of place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return self.head((nn.functional.relu(h) + h).mean((2, 3)))


def _relu_targets(mesa: MESA) -> list[object]:
    graph = mesa._folded.graph
    modules = dict(graph.named_modules())
    return [
        n.target if n.op == "call_function" else type(modules[n.target])
        for n in graph.graph.nodes
        if n.target in (torch.relu, torch.relu_, F.relu)
        or (n.op == "call_module" and isinstance(modules[n.target], nn.ReLU))
    ]


def test_relu_after_a_folded_layer_runs_in_place_only_when_nothing_else_reads_its_input():
    torch.manual_seed(0)
    # _cnn: conv→BN→ReLU and linear→BN1d→ReLU are folded and their ReLUs are the only
    # readers; the residual's relu reads a sum, not a folded output.
    assert _relu_targets(MESA(_cnn())) == [torch.relu_, torch.relu, torch.relu_]
    model = _SharedPreActivation()
    mesa = MESA(model, decay=0.5, start_epoch=0)
    assert _relu_targets(mesa) == [F.relu]
    x = torch.randn(5, 3, 8, 8)
    _moved_student_and_teacher(model, mesa, x)
    torch.testing.assert_close(
        mesa.teacher_logits(x), _plain_eval_forward(mesa, x), rtol=1e-5, atol=1e-6
    )
