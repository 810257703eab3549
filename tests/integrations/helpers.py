"""Helpers of the tests/integrations package: a tiny BatchNorm model and its data, the
README's own SAM loops as the reference every framework is compared with, and the
comparison of weights and BatchNorm statistics.

Each framework test trains the same model on the same batches inside the framework and
with :func:`readme_loop` (or :func:`readme_accumulation`), then compares every tensor of
the two state dicts to 1e-6 (``num_batches_tracked`` exactly).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatmin import SAM
from flatmin.optim.bn import running_stats_frozen

N, D, C, BATCH = 64, 8, 3, 16
SAM_SETTINGS = dict(rho=0.05, lr=0.1, momentum=0.9)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, C))


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def loader(batch_size: int = BATCH, with_index: bool = False) -> DataLoader:
    x, y = make_data()
    parts = (x, y, torch.arange(N)) if with_index else (x, y)
    return DataLoader(TensorDataset(*parts), batch_size=batch_size, shuffle=False)


def batches(batch_size: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data()
    return list(zip(x.split(batch_size), y.split(batch_size)))


def readme_loop(epochs: int = 1, optimizer=SAM, **kw) -> tuple[nn.Module, list[float]]:
    """``opt.zero_grad(); loss = opt.step(closure)`` per batch with ``SAM(model=net)``."""
    net = make_net()
    opt = optimizer(net.parameters(), torch.optim.SGD, model=net, **{**SAM_SETTINGS, **kw})
    losses = []
    for _ in range(epochs):
        for x, y in batches():

            def closure(x=x, y=y):
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            opt.zero_grad()
            losses.append(float(opt.step(closure).detach()))
    return net, losses


def readme_accumulation(micro: int = 2) -> nn.Module:
    """The README's accumulation recipe: every micro-batch's backward before ``first_step``
    and again before ``second_step``; one step covers ``micro`` consecutive batches."""
    net = make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, **SAM_SETTINGS)
    data = batches()
    for i in range(0, len(data), micro):
        group = data[i : i + micro]
        for x, y in group:
            (F.cross_entropy(net(x), y) / micro).backward()
        opt.first_step(zero_grad=True)
        with running_stats_frozen(net):
            for x, y in group:
                (F.cross_entropy(net(x), y) / micro).backward()
        opt.second_step(zero_grad=True)
    return net


def readme_scaled_loop(scaler: torch.amp.GradScaler) -> nn.Module:
    """The README loop under float16 autocast with a GradScaler: ``step(closure,
    grad_scaler=scaler)`` and ``scaler.update()`` per batch."""
    net = make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, model=net, **SAM_SETTINGS)
    for x, y in batches():

        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            return loss

        opt.zero_grad()
        opt.step(closure, grad_scaler=scaler)
        scaler.update()
    return net


def assert_same_training(got: nn.Module, reference: nn.Module, atol: float = 1e-6) -> None:
    """Weights and BatchNorm statistics to ``atol``, ``num_batches_tracked`` exactly."""
    mine, theirs = got.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if key.endswith("num_batches_tracked"):
            assert int(mine[key]) == int(value), key
        else:
            torch.testing.assert_close(mine[key].double(), value.double(), rtol=0, atol=atol)


def weights(module: nn.Module) -> dict[str, object]:
    """A copy of the module's state dict (tensors cloned; extra state as it is)."""
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
        for k, v in module.state_dict().items()
    }


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters only (a refused step may still have moved BatchNorm
    statistics in a forward pass, as any training-mode forward does)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}
