"""Models for the reference trainer: ``build_model(name, num_classes, input_shape)``.

* ``mlp``: flatten → 256 → 256 → classes, ReLU.
* ``cnn1d``: the 1-D CNN of the MNIST-1D paper (Greydanus & Kobak, 2024): three
  25-channel convolutions (kernels 5, 3, 3; stride 2, padding 1) with ReLU, then a
  linear layer (5,210 parameters on length-40 signals).
* ``cnn``: a small BatchNorm CNN for 1- or 3-channel images of any size ≥ 4×4:
  three conv-BN-ReLU stages (32, 64, 128 channels; 2×2 max-pooling after the first two),
  global average pooling, linear.
* ``resnet18``: ResNet-18 (He et al., 2016) in its CIFAR form: 3×3 stem without
  max-pooling, BasicBlocks [2, 2, 2, 2] of widths 64–512, 11,173,962 parameters for 10
  classes.
* ``wrn16_4``, ``wrn28_10``: Wide ResNets (Zagoruyko & Komodakis, 2016) with
  pre-activation blocks (BN-ReLU-conv), widths 16·k, 32·k, 64·k, dropout 0 — 2,748,890 and
  36,479,194 parameters for 10 classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

MODELS = ("mlp", "cnn1d", "cnn", "resnet18", "wrn16_4", "wrn28_10")


def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: int = 256) -> nn.Module:
    in_features = 1
    for size in input_shape:
        in_features *= size
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn1d(num_classes: int, input_shape: tuple[int, ...], channels: int = 25) -> nn.Module:
    in_channels, length = input_shape
    for kernel in (5, 3, 3):  # output length of a stride-2, padding-1 convolution
        length = (length + 2 - kernel) // 2 + 1
    if length < 1:
        raise ValueError(f"cnn1d needs signals of length ≥ 5, got input_shape {input_shape}")
    return nn.Sequential(
        nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * length, num_classes),
    )


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    c, h, w = input_shape
    if min(h, w) < 4:
        raise ValueError(f"cnn pools twice by 2 and needs images of at least 4×4, got {h}×{w}")
    model = nn.Sequential(
        *_conv_bn_relu(c, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )
    return _init(model)


class BasicBlock(nn.Module):
    """ResNet block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the shortcut is a
    strided 1×1 conv + BN when the shape changes (He et al., 2016, option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [*_conv_bn_relu(input_shape[0], 64)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return _init(nn.Sequential(*layers))


class PreActBlock(nn.Module):
    """Wide-ResNet block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut(x)``; the shortcut
    is a strided 1×1 conv (no BN) on the activated input when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


def wide_resnet(
    depth: int, width: int, num_classes: int, input_shape: tuple[int, ...]
) -> nn.Module:
    """WRN-``depth``-``width``: ``(depth − 4) / 6`` blocks per stage."""
    if (depth - 4) % 6:
        raise ValueError(f"Wide-ResNet depth must be 6n + 4, got {depth}")
    blocks_per_stage = (depth - 4) // 6
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False)]
    c_in = 16
    for c_out, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
        for i in range(blocks_per_stage):
            layers.append(PreActBlock(c_in, c_out, stride if i == 0 else 1))
            c_in = c_out
    layers += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(c_in, num_classes))
    return _init(nn.Sequential(*layers))


def _init(model: nn.Module) -> nn.Module:
    """He-normal (fan-out) convolutions, BN γ = 1 and β = 0, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model


# name -> (builder, number of dimensions of input_shape it accepts, description)
_BUILDERS: dict[str, tuple[Callable[[int, tuple[int, ...]], nn.Module], int | None, str]] = {
    "mlp": (mlp, None, "any"),
    "cnn1d": (cnn1d, 2, "(channels, length)"),
    "cnn": (cnn, 3, "(channels, height, width)"),
    "resnet18": (resnet18, 3, "(channels, height, width)"),
    "wrn16_4": (lambda k, s: wide_resnet(16, 4, k, s), 3, "(channels, height, width)"),
    "wrn28_10": (lambda k, s: wide_resnet(28, 10, k, s), 3, "(channels, height, width)"),
}


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`) for inputs of ``input_shape`` (no batch
    dimension) and ``num_classes`` outputs. Weights come from the global torch RNG."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int ≥ 2, got {num_classes!r}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be positive sizes without the batch dim, got {shape}")
    builder, ndim, description = _BUILDERS[name]
    if ndim is not None and len(shape) != ndim:
        raise ValueError(
            f"model {name!r} expects input_shape {description}, got {shape}"
            + ("; use 'cnn1d' or 'mlp' for 1-D signals" if len(shape) == 2 else "")
            + ("; use 'cnn', 'resnet18' or a wrn for images" if len(shape) == 3 else "")
        )
    return builder(num_classes, shape)
