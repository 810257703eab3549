import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatmin.trajectory.fold import FoldedForward
from tests.trajectory.helpers import bn_cnn, move_student, plain_eval_forward


class _BatchNormCalls(torch.overrides.TorchFunctionMode):
    """Counts the calls of ``F.batch_norm`` made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.batch_norm
        return func(*args, **(kwargs or {}))


def _trained_cnn(memory_format=torch.contiguous_format) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    network = bn_cnn()
    x = torch.randn(5, 3, 8, 8)
    move_student(network, x)
    return network.eval().to(memory_format=memory_format), x


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_folded_forward_equals_the_plain_eval_forward_and_skips_the_folded_norms(memory_format):
    network, x = _trained_cnn(memory_format)
    fast = FoldedForward.build(network)
    counter = _BatchNormCalls()
    with counter, torch.no_grad():
        out = fast(x)
    assert counter.calls == 1  # all but the BN whose input is also used elsewhere
    torch.testing.assert_close(out, plain_eval_forward(network, x), rtol=1e-5, atol=1e-6)


def test_folded_weights_are_the_closed_form():
    network, _ = _trained_cnn(torch.channels_last)
    fast = FoldedForward.build(network)
    fast.refold()
    conv, bn = network[0], network[1]
    unit = fast.units[0]
    assert unit.layer is conv and unit.norm is bn  # the network's own modules, not copies
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    weight, bias = unit.folded
    torch.testing.assert_close(weight.double(), conv.weight.double() * scale[:, None, None, None])
    torch.testing.assert_close(bias.double(), bn.bias.double() - scale * bn.running_mean.double())
    assert weight.is_contiguous(memory_format=torch.channels_last)  # the layer's layout
    # The residual's shortcut BN has no affine part: s = 1/√(σ² + ε), b' = −s·μ.
    shortcut, shortcut_bn = network[4].shortcut, network[4].shortcut_bn
    weight, bias = fast.units[1].folded
    scale = (shortcut_bn.running_var.double() + shortcut_bn.eps).rsqrt()
    torch.testing.assert_close(
        weight.double(), shortcut.weight.double() * scale[:, None, None, None]
    )
    torch.testing.assert_close(bias.double(), -scale * shortcut_bn.running_mean.double())


def test_folded_weights_follow_in_place_changes_and_loaded_state():
    network, x = _trained_cnn()
    fast = FoldedForward.build(network)
    fast(x)
    with torch.no_grad():  # e.g. an EMA update or a broadcast of rank 0's teacher
        network[1].running_var.mul_(4.0)
        network[0].weight.neg_()
    torch.testing.assert_close(fast(x), plain_eval_forward(network, x), rtol=1e-5, atol=1e-6)
    other, _ = _trained_cnn()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    network.load_state_dict(other.state_dict())
    torch.testing.assert_close(fast(x), plain_eval_forward(other, x), rtol=1e-5, atol=1e-6)


def test_a_network_converted_to_another_dtype_is_folded_again():
    network, x = _trained_cnn()
    fast = FoldedForward.build(network)
    fast(x)
    network.double()
    assert fast.matches(network)  # module calls look their tensors up afresh
    out = fast(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, plain_eval_forward(network, x.double()), rtol=1e-12, atol=0)


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


def test_untraceable_or_pairless_networks_build_nothing():
    assert FoldedForward.build(_DataDependent()) is None
    assert FoldedForward.build(nn.Sequential(nn.Linear(3, 3), nn.ReLU())) is None


def test_a_linear_layer_on_tokens_runs_its_norm_as_it_is():
    torch.manual_seed(0)
    network = _Tokens()
    x = torch.randn(6, 5, 5)
    move_student(network, x)
    fast = FoldedForward.build(network.eval())
    assert fast is not None  # traced and paired, but 3-D inputs are not the fold's axis
    torch.testing.assert_close(fast(x), plain_eval_forward(network, x), rtol=1e-6, atol=1e-7)


def test_memory_counts_the_folded_weights_and_biases():
    fast = FoldedForward.build(bn_cnn().eval())
    # The first conv (4·3·3·3), the residual's 1×1 shortcut (4·4) and the first linear
    # layer (6·64), each with a new bias per output channel (4, 4 and 6).
    assert fast.memory_bytes == 4 * ((4 * 27 + 4) + (16 + 4) + (6 * 64 + 6))


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


def _relu_targets(fast: FoldedForward) -> list[object]:
    graph = fast.graph
    modules = dict(graph.named_modules())
    return [
        n.target if n.op == "call_function" else type(modules[n.target])
        for n in graph.graph.nodes
        if n.target in (torch.relu, torch.relu_, F.relu)
        or (n.op == "call_module" and isinstance(modules[n.target], nn.ReLU))
    ]


def test_relu_after_a_folded_layer_runs_in_place_only_when_nothing_else_reads_its_input():
    # bn_cnn: conv→BN→ReLU and linear→BN1d→ReLU are folded and their ReLUs are the only
    # readers; the residual's relu reads a sum, not a folded output.
    assert _relu_targets(FoldedForward.build(bn_cnn().eval())) == [
        torch.relu_,
        torch.relu,
        torch.relu_,
    ]
    torch.manual_seed(0)
    network = _SharedPreActivation()
    x = torch.randn(5, 3, 8, 8)
    move_student(network, x)
    fast = FoldedForward.build(network.eval())
    assert _relu_targets(fast) == [F.relu]
    torch.testing.assert_close(fast(x), plain_eval_forward(network, x), rtol=1e-5, atol=1e-6)
