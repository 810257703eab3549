import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatmin.train.method import Method, MethodContext, SinglePassUpdate
from flatmin.train.registry import METHODS, get_method, register
from flatmin.train.spec import Hyperparameter, MethodSpec

CONTEXT = MethodContext(num_samples=16, num_classes=3)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8)


def test_the_issue_methods_are_registered():
    expected = {"sgd", "adamw", "sam", "asam", "usam", "stablesam", "saf", "mesa"}
    expected |= {"gsam", "looksam", "esam"}
    assert expected <= set(METHODS)


@pytest.mark.parametrize(
    ("method", "defaults"),
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9}),
        ("sam", {"rho": 0.05, "momentum": 0.9}),  # Foret et al.: ρ = 0.05, SGD momentum 0.9
        ("asam", {"rho": 0.5, "eta": 0.01}),  # Kwon et al., CIFAR-10
        ("stablesam", {"rho": 0.05, "stable_cap": False}),
        ("saf", {"lam": 0.3, "tau": 5.0, "lag_epochs": 3, "start_epoch": 5, "top_k": 0}),
        ("mesa", {"lam": 0.8, "tau": 5.0, "ema_decay": 0.9998, "start_epoch": 5}),
        ("adamw", {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999}),
        (
            "gsam",
            {"rho": 0.05, "alpha": 0.4},
        ),  # the GSAM paper's α ≈ 0.4 (Zhuang et al., ICLR 2022)
        ("looksam", {"k": 5, "alpha": 0.7}),
        ("esam", {"beta": 0.6, "gamma": 0.5}),  # the authors' CIFAR ResNet-18 settings
    ],
)
def test_paper_defaults(method, defaults):
    resolved = get_method(method).resolve({})
    for name, value in defaults.items():
        assert resolved[name] == value


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown method 'lion'") as info:
        get_method("lion")
    for name in METHODS:
        assert name in str(info.value)


def test_resolve_rejects_foreign_and_bad_values():
    sam = get_method("sam")
    with pytest.raises(ValueError, match=r"--tau does not apply to method 'sam'"):
        sam.resolve({"tau": 2.0})
    with pytest.raises(ValueError, match=r"^--rho must be a finite number >= 0.0, got -0.1$"):
        sam.resolve({"rho": -0.1})
    with pytest.raises(ValueError, match=r"^--rho must be a finite number >= 0.0, got inf$"):
        sam.resolve({"rho": float("inf")})
    with pytest.raises(ValueError, match=r"^--lag-epochs must be an integer >= 1, got 1.5$"):
        get_method("saf").resolve({"lag_epochs": 1.5})
    with pytest.raises(ValueError, match=r"^--nesterov must be one of True, False, got 1$"):
        sam.resolve({"nesterov": 1})
    assert get_method("saf").resolve({"lag_epochs": 2.0})["lag_epochs"] == 2


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register(METHODS["sgd"])


def test_sgd_step_equals_torch_sgd():
    model = _model()
    reference = copy.deepcopy(model)
    x, y, index = _batch()
    method = get_method("sgd").create(model, {"lr": 0.05}, CONTEXT)
    method.train_step(model, x, y, index, F.cross_entropy)

    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(reference(x), y).backward()
    opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sam_step_follows_the_sam_rule():
    """w ← SGD(w, ∇L(w + ρ g/‖g‖)), computed here by hand with autograd."""
    model = _model()
    x, y, index = _batch()
    w = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    g = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g, strict=True):
            p.add_(0.05 * t / norm)
    g_s = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    lr = 0.1
    expected = [wi - lr * gi for wi, gi in zip(w, g_s, strict=True)]  # first momentum step

    method = get_method("sam").create(model, {"lr": lr, "weight_decay": 0.0}, CONTEXT)
    out = method.train_step(model, x, y, index, F.cross_entropy)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    # The reported loss is the first pass's, at the unperturbed weights.
    with torch.no_grad():
        first_pass_loss = F.cross_entropy(_model_at(model, w)(x), y)
    assert float(out.loss) == pytest.approx(float(first_pass_loss))


def _model_at(model: nn.Module, weights) -> nn.Module:
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(clone.parameters(), weights, strict=True):
            p.copy_(w)
    return clone


def test_sam_keeps_batchnorm_statistics_to_the_first_pass():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y, index = _batch()
    reference = copy.deepcopy(model)
    reference(x)  # one training-mode forward at w: what the running stats must reflect
    method = get_method("sam").create(model, {}, CONTEXT)
    method.train_step(model, x, y, index, F.cross_entropy)
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_mesa_teacher_moves_after_every_step():
    model = _model()
    theta0 = [p.detach().clone() for p in model.parameters()]
    x, y, index = _batch()
    method = get_method("mesa").create(model, {"ema_decay": 0.9}, CONTEXT)
    method.train_step(model, x, y, index, F.cross_entropy)
    teacher = method.terms["mesa"].mesa.teacher
    for v, t0, t1 in zip(teacher.parameters(), theta0, model.parameters(), strict=True):
        torch.testing.assert_close(v, 0.9 * t0 + 0.1 * t1.detach())


def test_saf_term_compares_with_the_first_pass_logits_of_the_previous_epoch():
    model = _model()
    x, y, index = _batch()
    with torch.no_grad():
        stored = model(x).half().float()  # the first pass at w0, kept in float16
    method = get_method("saf").create(
        model, {"lr": 2.0, "lag_epochs": 1, "start_epoch": 0}, CONTEXT
    )
    method.set_epoch(0)
    method.train_step(model, x, y, index, F.cross_entropy)
    method.set_epoch(1)
    with torch.no_grad():
        logits = model(x)
    term = method.terms["saf"](x, logits, index, first_pass=False)
    kl = F.kl_div(F.log_softmax(logits / 5, 1), F.softmax(stored / 5, 1), reduction="batchmean")
    assert float(term) > 0
    assert float(term) == pytest.approx(0.3 * 5**2 * float(kl), rel=1e-4)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("sgd", lambda n_params: 0),
        ("sam", lambda n_params: 4 * n_params),  # the float32 copy of w between passes
        ("gsam", lambda n_params: 8 * n_params),  # ... and the clean gradient g
        ("looksam", lambda n_params: 12 * n_params),  # ... and the kept g_v
        ("mesa", lambda n_params: 4 * n_params),  # the EMA teacher (no buffers here)
        # SAF: N·C·Ẽ float16 logits + N·Ẽ int32 epoch stamps (Ẽ = 3).
        ("saf", lambda n_params: 16 * 3 * 3 * 2 + 16 * 3 * 4),
    ],
)
def test_extra_memory(method, expected):
    model = _model()
    n_params = sum(p.numel() for p in model.parameters())
    built = get_method(method).create(model, {}, CONTEXT)
    assert built.extra_memory_bytes(model) == expected(n_params)


def test_saf_top_k_builds_the_compressed_store_and_refuses_more_than_c():
    model = _model()
    built = get_method("saf").create(model, {"top_k": 2}, CONTEXT)
    saf = built.terms["saf"].saf
    assert saf.top_k == 2 and saf.store.top_k == 2
    # per sample and slot: 4 (rest_lse) + 2·2 (float16 values) + 2·1 (uint8 classes) → 12
    # bytes, + 4 for the epoch stamp; N = 16, Ẽ = 3
    assert built.extra_memory_bytes(model) == 16 * 3 * (12 + 4)
    assert get_method("saf").create(model, {"top_k": 0}, CONTEXT).terms["saf"].saf.top_k is None
    with pytest.raises(ValueError, match=r"--top-k must be 0 .* 3 classes, got 4"):
        get_method("saf").create(model, {"top_k": 4}, CONTEXT)
    with pytest.raises(ValueError, match="--top-k must be an integer >= 0, got -1"):
        get_method("saf").resolve({"top_k": -1})


def test_method_state_round_trip_and_mismatch():
    model = _model()
    x, y, index = _batch()
    method = get_method("mesa").create(model, {"ema_decay": 0.5}, CONTEXT)
    method.train_step(model, x, y, index, F.cross_entropy)
    state = copy.deepcopy(method.state_dict())
    other = get_method("mesa").create(_model(), {"ema_decay": 0.5}, CONTEXT)
    other.load_state_dict(state)
    for a, b in zip(
        method.terms["mesa"].mesa.teacher.parameters(),
        other.terms["mesa"].mesa.teacher.parameters(),
        strict=True,
    ):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected"):
        get_method("sgd").create(_model(), {}, CONTEXT).load_state_dict(state)


@pytest.fixture
def toy_method():
    """A method registered by a test the way a new family member would be."""

    class HalfStep(SinglePassUpdate):
        def step(self, model, optimizer, compute):
            optimizer.zero_grad(set_to_none=True)
            out = compute(True)
            (0.5 * out.objective).backward()
            optimizer.step()
            return out

    def build(model, hp, ctx):
        return Method(torch.optim.SGD(model.parameters(), lr=hp["lr"]), HalfStep())

    spec = register(
        MethodSpec("halfsgd", "SGD on half the loss", (Hyperparameter("lr", 0.2, "lr"),), build)
    )
    yield spec
    del METHODS["halfsgd"]


def test_a_new_method_is_one_register_call(toy_method):
    model = _model()
    reference = copy.deepcopy(model)
    x, y, index = _batch()
    get_method("halfsgd").create(model, {}, CONTEXT).train_step(model, x, y, index, F.cross_entropy)
    g = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
    for p, r, gi in zip(model.parameters(), reference.parameters(), g, strict=True):
        # Half the loss at lr 0.2 is the full loss at lr 0.1.
        torch.testing.assert_close(p.detach(), r.detach() - 0.1 * gi)


def test_esam_gets_per_sample_losses_and_selects_data():
    """The registry's ESAM step equals ESAM.step driven by hand with a per-sample closure."""
    from flatmin.optim.esam import ESAM

    model = _model()
    reference = copy.deepcopy(model)
    x, y, index = _batch()
    method = get_method("esam").create(model, {"beta": 1.0}, CONTEXT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scalar loss would warn that selection is off
        method.train_step(model, x, y, index, nn.CrossEntropyLoss(reduction="none"))

    opt = ESAM(reference.parameters(), torch.optim.SGD, rho=0.05, beta=1.0, gamma=0.5,
               seed=CONTEXT.seed, lr=0.1, momentum=0.9, weight_decay=5e-4)  # fmt: skip

    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(reference(xb), yb, reduction="none")

    opt.zero_grad()
    opt.step(closure, model=reference)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_looksam_reuse_steps_run_one_pass():
    model = _model()
    x, y, index = _batch()
    method = get_method("looksam").create(model, {"k": 3}, CONTEXT)
    calls = []
    counting = _Counting(model, calls)
    for _ in range(6):
        method.train_step(counting, x, y, index, F.cross_entropy)
    # Steps 0 and 3 are full SAM steps (two passes), the other four reuse g_v (one pass).
    assert len(calls) == 2 * 2 + 4


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module, calls: list) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls.append(1)
        return self.inner(x)
