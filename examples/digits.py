"""Shared by the examples: scikit-learn's digits (8×8 images, bundled, no download) as
tensors, a small BatchNorm network and its test accuracy. ``--tiny`` shrinks a run to a
few steps (the tests run every example that way)."""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="a few steps, for the tests")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    if args.tiny:
        args.epochs = 2
    return args


def load(tiny: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1,497 training and 300 test images in [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train, test = slice(300, 428 if tiny else None), slice(0, 300)
    return x[train], y[train], x[test], y[test]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return correct
