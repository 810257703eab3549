import pytest
import torch
from torch import nn

from flatmin.train.models import MODELS, build_model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Independent hand counts: a k×k conv without bias has c_in·c_out·k² weights, a BatchNorm
# has 2·c (γ, β), a linear layer c_in·c_out + c_out.
def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k


def bn(c: int) -> int:
    return 2 * c


def linear(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


def resnet18_cifar_count(num_classes: int) -> int:
    total = conv(3, 64) + bn(64)
    c_in = 64
    for c_out in (64, 128, 256, 512):
        for _ in range(2):
            total += conv(c_in, c_out) + bn(c_out) + conv(c_out, c_out) + bn(c_out)
            if c_in != c_out:  # the first block of each later stage changes shape
                total += conv(c_in, c_out, 1) + bn(c_out)
            c_in = c_out
    return total + linear(512, num_classes)


def wrn_count(depth: int, width: int, num_classes: int) -> int:
    n = (depth - 4) // 6
    total = conv(3, 16)
    c_in = 16
    for c_out in (16 * width, 32 * width, 64 * width):
        for _ in range(n):
            total += bn(c_in) + conv(c_in, c_out) + bn(c_out) + conv(c_out, c_out)
            if c_in != c_out:
                total += conv(c_in, c_out, 1)
            c_in = c_out
    return total + bn(c_in) + linear(c_in, num_classes)


def test_resnet18_matches_published_count():
    # 11,173,962: the CIFAR ResNet-18 figure of the popular kuangliu/pytorch-cifar form.
    assert resnet18_cifar_count(10) == 11_173_962
    assert num_params(build_model("resnet18", 10, (3, 32, 32))) == 11_173_962
    assert num_params(build_model("resnet18", 100, (3, 32, 32))) == resnet18_cifar_count(100)


@pytest.mark.parametrize(
    ("name", "depth", "width", "published"),
    [("wrn16_4", 16, 4, 2_748_890), ("wrn28_10", 28, 10, 36_479_194)],
)
def test_wide_resnet_matches_published_count(name, depth, width, published):
    assert wrn_count(depth, width, 10) == published
    # Parameter counts do not depend on the spatial size: build on small images.
    assert num_params(build_model(name, 10, (3, 8, 8))) == published
    assert num_params(build_model(name, 100, (3, 8, 8))) == wrn_count(depth, width, 100)


@pytest.mark.parametrize("shape", [(1, 40), (1, 28, 28), (3, 32, 32)])
def test_mlp_count_is_two_hidden_layers_of_256(shape):
    d = 1
    for s in shape:
        d *= s
    expected = linear(d, 256) + linear(256, 256) + linear(256, 7)
    assert num_params(build_model("mlp", 7, shape)) == expected


def test_cnn1d_is_the_mnist1d_paper_cnn():
    # Length 40 → 19 → 10 → 5 after three stride-2, padding-1 convs (kernels 5, 3, 3).
    expected = (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + linear(25 * 5, 10)
    assert expected == 5_210
    assert num_params(build_model("cnn1d", 10, (1, 40))) == expected


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (1, 40)),
        ("mlp", (1, 8, 8)),
        ("cnn1d", (1, 40)),
        ("cnn", (1, 28, 28)),
        ("cnn", (1, 8, 8)),
        ("cnn", (3, 32, 32)),
        ("resnet18", (3, 32, 32)),
        ("resnet18", (1, 8, 8)),
        ("wrn16_4", (3, 16, 16)),
        ("wrn28_10", (3, 8, 8)),
    ],
)
def test_forward_gives_one_logit_per_class(name, shape):
    model = build_model(name, 10, shape)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn", "resnet18", "wrn16_4"])
def test_every_parameter_gets_a_gradient(name):
    model = build_model(name, 3, (1, 8, 8))
    model(torch.randn(4, 1, 8, 8)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_build_is_deterministic_given_the_torch_seed():
    torch.manual_seed(3)
    a = build_model("cnn", 10, (1, 8, 8))
    torch.manual_seed(3)
    b = build_model("cnn", 10, (1, 8, 8))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'") as err:
        build_model("vgg", 10, (3, 32, 32))
    for name in MODELS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("name", "shape", "hint"),
    [
        ("cnn", (1, 40), "cnn1d"),
        ("resnet18", (1, 40), "cnn1d"),
        ("cnn1d", (1, 28, 28), "cnn"),
        ("cnn", (1, 2, 2), "4×4"),
    ],
)
def test_incompatible_input_shape_is_refused(name, shape, hint):
    with pytest.raises(ValueError, match=hint):
        build_model(name, 10, shape)


@pytest.mark.parametrize("num_classes", [0, 1, 2.5, True])
def test_bad_class_count_is_refused(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", num_classes, (1, 40))
