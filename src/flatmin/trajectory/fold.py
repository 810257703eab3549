r"""A fast eval-mode forward for a network that is never trained: BatchNorm folded away.

An eval-mode BatchNorm is an affine map per channel, so when it directly follows a
convolution or linear layer the two are one layer with

.. math::
    s = γ / \sqrt{σ^2_{run} + ε},\qquad W' = s·W,\qquad b' = s·(b − μ_{run}) + β

(``torch.nn.utils.fusion.fuse_conv_bn_weights`` and ``fuse_linear_bn_weights`` compute
exactly this). :class:`FoldedForward` traces the network with ``torch.fx``, replaces every
such pair by the folded layer, and lets a ReLU that is the folded layer's only reader run
in place. It owns no state: every other module call goes to the network's own
submodules, and the folded weights are derived from the network's current tensors,
recomputed at the first forward after any of them changed. MESA runs its teacher this way
(its weights change only through the EMA update); the values equal the plain eval forward
up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

_CONV_NORMS: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Linear: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
}
_RELU_FUNCTIONS = (torch.relu, nn.functional.relu)


class FoldedForward:
    """``network``'s eval forward through its ``torch.fx`` graph with BatchNorms folded.

    Build it with :meth:`build`, which returns ``None`` for a network that cannot be
    traced or has no foldable pair (run the network itself then). Calling it refolds when
    a tensor a fold reads has a new version (any in-place change: an EMA update,
    ``load_state_dict``, a broadcast) or new storage (``.to()``), then runs the graph.
    Check :meth:`matches` before a call: after ``.to()`` replaced a tensor that the graph
    reads directly, build it again.

    Example, for an eval-mode network ``teacher`` (here a copy of a BatchNorm CNN):

    .. test: setup=model

    ::

        import copy

        teacher = copy.deepcopy(model).eval()
        fast = FoldedForward.build(teacher)
        with torch.no_grad():
            logits = fast(x) if fast is not None else teacher(x)
    """

    def __init__(self, graph: fx.GraphModule, units: list[FoldedLayer], network: nn.Module):
        self.graph = graph
        self.units = units
        self.network = network
        self.attributes = [n.target for n in graph.graph.nodes if n.op == "get_attr"]
        self.key: list[tuple[int, int, int]] | None = None

    @classmethod
    def build(cls, network: nn.Module) -> FoldedForward | None:
        """Trace and fold ``network``; ``None`` when it cannot be traced or has no pair."""
        try:
            graph = fx.symbolic_trace(network)
        except Exception:  # any untraceable forward runs unfolded
            return None
        modules = dict(graph.named_modules())
        units = []
        for node in list(graph.graph.nodes):
            if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
                continue
            source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not (
                isinstance(source, fx.Node)
                and source.op == "call_module"
                and len(source.users) == 1
                and _foldable(modules[source.target], modules[node.target])
            ):
                continue
            unit = FoldedLayer(modules[source.target], modules[node.target])
            name = f"_folded_{len(units)}"
            graph.add_submodule(name, unit)
            source.target = name
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
            units.append(unit)
        if not units:
            return None
        _relu_in_place(graph, set(units))
        graph.graph.lint()
        graph.recompile()
        return cls(graph, units, network)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the folded weights and biases."""
        return sum(
            (u.layer.weight.numel() + u.layer.weight.shape[0]) * u.layer.weight.element_size()
            for u in self.units
        )

    def matches(self, network: nn.Module) -> bool:
        """Whether the tensors the graph reads directly are still ``network``'s own.

        Module calls and folds look their tensors up afresh; only ``get_attr`` reads
        (tensors used outside a submodule call, rare) hold references that ``.to()``
        could leave behind.
        """
        return network is self.network and all(
            _attribute(self.graph, name) is _attribute(network, name) for name in self.attributes
        )

    def __call__(self, inputs: Any) -> Any:
        key = [
            (id(t), t.data_ptr(), t._version)
            for u in self.units
            for t in u.sources()
            if t is not None
        ]
        if key != self.key:
            self.refold()
            self.key = key
        return self.graph(inputs)

    @torch.no_grad()
    def refold(self) -> None:
        """Recompute every pair's ``W'`` and ``b'`` from the network's current tensors."""
        for unit in self.units:
            unit.refold()


class FoldedLayer(nn.Module):
    """``norm(layer(x))`` for an eval-mode BatchNorm, as ``layer`` with folded weights.

    Holds the network's own ``layer`` and ``norm`` (shared, never copied) and the folded
    ``(weight, bias)`` that :meth:`refold` derives from them. Inputs whose channel axis is
    not the one the norm normalizes (a linear layer on more than 2-D inputs, an unbatched
    convolution) run the two layers as they are.
    """

    def __init__(self, layer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.batched_dim = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()
        self.folded: tuple[Tensor, Tensor] | None = None

    def sources(self) -> tuple[Tensor | None, ...]:
        """The tensors the fold reads, looked up afresh (``.to()`` may replace them):
        ``W, b, γ, β, μ_run, σ²_run``.

        Read from the modules' parameter and buffer dicts, as ``nn.Module.__getattr__``
        would cost more than the rest of this bookkeeping at every forward.
        """
        layer, norm = self.layer._parameters, self.norm._parameters
        stats = self.norm._buffers
        return (
            layer["weight"],
            layer.get("bias"),
            norm.get("weight"),
            norm.get("bias"),
            stats["running_mean"],
            stats["running_var"],
        )

    @torch.no_grad()
    def refold(self) -> None:
        weight, bias, gamma, beta, mean, var = self.sources()
        if isinstance(self.layer, nn.Linear):
            if gamma is None:  # fuse_linear_bn_weights needs an affine norm
                gamma, beta = torch.ones_like(mean), torch.zeros_like(mean)
            fused = fuse_linear_bn_weights(weight, bias, mean, var, self.norm.eps, gamma, beta)
        else:
            fused = fuse_conv_bn_weights(weight, bias, mean, var, self.norm.eps, gamma, beta)
        self.folded = (fused[0].detach(), fused[1].detach())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.batched_dim or self.folded is None:
            return self.norm(self.layer(x))
        weight, bias = self.folded
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, weight, bias)
        return self.layer._conv_forward(x, weight, bias)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks would see ``module``'s submodules run: a folded graph
    would skip the folded norms, so such a network runs unfolded."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _foldable(layer: nn.Module, norm: nn.Module) -> bool:
    """Whether ``norm(layer(x))`` in eval mode is one affine map per output channel."""
    norms = _CONV_NORMS.get(type(layer))
    return (
        norms is not None
        and type(norm) in norms
        and norm.track_running_stats
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.num_features == layer.weight.shape[0]
    )


def _relu_in_place(graph: fx.GraphModule, folded: set[nn.Module]) -> None:
    """Rewrite ``relu(folded(x))`` as ``relu_(folded(x))`` where nothing else reads the
    folded layer's output: the network runs without autograd and that output is a fresh
    tensor, so the in-place ReLU changes no value and spares an allocation and a pass over
    memory."""
    modules = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        if node.op == "call_module":
            module = modules[node.target]
            is_relu = type(module) is nn.ReLU and not module.inplace
        elif node.op == "call_function":
            is_relu = node.target in _RELU_FUNCTIONS and not node.kwargs.get("inplace", False)
        else:
            is_relu = False
        source = node.args[0] if is_relu and len(node.args) == 1 else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and modules[source.target] in folded
            and len(source.users) == 1
        ):
            node.op, node.target, node.kwargs = "call_function", torch.relu_, {}


def _attribute(module: nn.Module, name: str) -> Any:
    for part in name.split("."):
        module = getattr(module, part)
    return module
