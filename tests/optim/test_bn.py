import pytest
import torch
from torch import nn

from flatmin.optim.bn import disable_running_stats, enable_running_stats, running_stats_frozen


def net(momentum):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.InstanceNorm2d(4, track_running_stats=True, momentum=momentum),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
        nn.BatchNorm1d(3, momentum=momentum),
    )


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num" in k}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_frozen_forward_moves_no_statistics_and_no_counter(momentum):
    model = net(momentum).train()
    x = torch.randn(5, 2, 6, 6)
    model(x)
    before = buffers(model)
    with running_stats_frozen(model):
        out_frozen = model(x)
    assert all(torch.equal(before[k], v) for k, v in buffers(model).items())
    # the frozen forward still normalises with batch statistics, as in training mode
    twin = net(momentum).train()
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(out_frozen, twin(x), rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_disable_twice_then_enable_restores_exact_settings(momentum):
    model = net(momentum)
    settings = [
        (m.momentum, m.track_running_stats) for m in model.modules() if hasattr(m, "momentum")
    ]
    disable_running_stats(model)
    disable_running_stats(model)
    enable_running_stats(model)
    after = [(m.momentum, m.track_running_stats) for m in model.modules() if hasattr(m, "momentum")]
    assert after == settings
    assert model[1].momentum is momentum
    enable_running_stats(model)  # a second enable is a no-op
    assert [
        (m.momentum, m.track_running_stats) for m in model.modules() if hasattr(m, "momentum")
    ] == settings


def test_cumulative_average_after_frozen_pass_equals_never_frozen():
    x1, x2, x3 = (torch.randn(6, 3) for _ in range(3))
    a, b = nn.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    a(x1), b(x1)
    with running_stats_frozen(a):
        a(x2)
    a(x3), b(x3)
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
    assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 2


def test_frozen_context_restores_on_error():
    model = net(0.1)
    with pytest.raises(RuntimeError), running_stats_frozen(model):
        raise RuntimeError("boom")
    assert model[1].track_running_stats and model[2].momentum == 0.1
