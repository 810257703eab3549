"""MESA: the memory-efficient SAF variant with an EMA teacher (Du et al., NeurIPS 2022)."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatmin._checks import check_choice, check_int, check_real
from flatmin.trajectory._state import require_keys
from flatmin.trajectory.kl import tempered_kl, zero_term

MemoryFormatChoice = torch.memory_format | Literal["auto"] | None
MEMORY_FORMATS = (
    "auto",
    None,
    torch.contiguous_format,
    torch.channels_last,
    torch.channels_last_3d,
)


class MESA:
    r"""Memory-Efficient Sharpness-Aware training: distil from an EMA of your own weights.

    Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022, Sec. "MESA". SAF's store
    of past outputs is replaced by a teacher whose weights are an exponential moving
    average of the student's, updated after every optimizer step:

    .. math::
        v_t = β_t·v_{t-1} + (1-β_t)·θ_t,\qquad v_0 = θ_0,

    and the loss is ``CE(z, y) + λ·τ²·mean_i KL(softmax(f_v(x_i)/τ) ‖ softmax(z_i/τ))``
    with the teacher in eval mode, run without autograd. Usage::

        mesa = MESA(model)
        for epoch in range(epochs):
            mesa.set_epoch(epoch)
            for x, y in loader:
                logits = model(x)
                loss = F.cross_entropy(logits, y) + mesa(x, logits)
                opt.zero_grad(); loss.backward(); opt.step()
                mesa.update()

    The teacher starts as a deep copy of ``model`` (same device and dtype, no shared
    storage, ``requires_grad=False``, eval mode). :meth:`update` moves every floating-point
    parameter *and buffer* (BatchNorm's running mean and variance included) with one
    ``torch._foreach_lerp_`` per group; integer buffers (``num_batches_tracked``) are copied.
    The paper sets ``v_1 = θ_1``; starting from a copy of the initial weights ``θ_0``
    instead differs by ``β^t·(1−β)``-weighted ``θ_0 − θ_1``, which fades as training goes on
    (and the term only starts after ``start_epoch`` epochs).

    **Decay warm-up.** With ``warmup=True`` the ``t``-th update (``t = 1, 2, …``) uses
    ``β_t = min(decay, (1 + t)/(10 + t))`` (the ``num_updates`` form of TensorFlow's
    ``ExponentialMovingAverage``): ``β_1 = 2/11`` so the teacher follows the student
    closely at first, and the full ``decay`` applies after ``t ≥ (10·decay − 1)/(1 − decay)``
    updates (44,991 for 0.9998). Without it (the official behaviour) ``β_t = decay``; at
    0.9998 the teacher's memory is ~5,000 steps, so short runs want the warm-up.

    **Counting epochs** is the same as :class:`flatmin.SAF`'s: 0-based ``set_epoch``, the
    term is active when ``epoch > start_epoch`` (official code); before that ``mesa(x, z)``
    returns an exact zero attached to ``z``'s graph without running the teacher. The EMA is
    updated from the first step on.

    **Cost.** One extra forward pass in eval mode, one copy of the weights and buffers and
    the folded weights below (:attr:`memory_bytes`; ``fold_batchnorm=False`` keeps one copy
    at the unfolded forward's speed); the paper reports ~15 % lower throughput and 98 MB for ResNet-50
    on GPUs. The throughput share is ``step / (step + teacher forward)``, so it depends on
    how expensive a forward is relative to a training step on the hardware at hand. A
    forward is about a third of a training step's FLOPs, so where both run equally
    efficiently (a compute-bound CPU) the share is at most ~75 %; on 2 CPU cores the fast
    forward below reached 75–78 % against SGD fed channels-last inputs and 85 % against
    SGD fed NCHW inputs, whose step is slower (``benchmarks/RESULTS.md``).

    **The teacher's fast forward.** The teacher is never trained, so every eval-mode
    BatchNorm that directly follows a convolution or linear layer (found by tracing the
    teacher with ``torch.fx``) is an affine map folded into that layer:

    .. math::
        s = γ / \sqrt{σ^2_{run} + ε},\qquad W' = s·W,\qquad b' = s·(b − μ_{run}) + β.

    The folded ``W', b'`` are recomputed lazily at the first teacher forward after the
    teacher's tensors changed (:meth:`update`, :meth:`load_state_dict`, a broadcast: any
    in-place change bumps a tensor's version), a few small tensor operations per fold. The
    unfolded EMA weights in :attr:`teacher` stay the source of truth (``state_dict`` is
    unchanged); the teacher's logits equal the plain eval forward up to float rounding. A
    teacher that cannot be traced, or that carries forward hooks, runs unfolded (forward
    hooks see the teacher's own modules run). On a shared 2-core CPU, the small NCHW CNN
    of ``benchmarks/trajectory_cost.py`` took 73 ms per EMA update and teacher forward
    before, 59 ms folded, 37 ms channels_last and 19 ms with both (the defaults): NCHW
    max-pooling and the 3-input-channel NCHW convolution are the slow kernels there. A
    ReLU that is the only reader of a folded layer's output then runs in place, which
    took the teacher forward from 16 to 8 ms on the idle machine.

    Args:
        model: the student; the teacher is a deep copy of it.
        decay: ``β`` (0.9998 in the official code; the paper uses ``β ∈ (0.9, 1)``).
        lam: ``λ`` (0.8).
        tau: temperature ``τ`` (5).
        start_epoch: ``E_start`` (5).
        warmup: use the decay warm-up above.
        teacher_memory_format: lay the teacher's 4-D weights out in this memory format
            (e.g. ``torch.channels_last``); ``None`` keeps the model's; ``"auto"`` (default)
            picks ``torch.channels_last`` for a teacher with 4-D weights on the CPU and
            keeps the model's layout elsewhere (on GPUs the better layout depends on dtype
            and hardware). Values, device and dtype are unchanged, only the teacher's
            forward kernels differ: on a CPU, a channels_last teacher ran its forward ~2×
            faster for an NCHW CNN in ``benchmarks/trajectory_cost.py``.
        fold_batchnorm: run the teacher with its eval-mode BatchNorms folded into the
            preceding layers (above); ``False`` runs :attr:`teacher` as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        lam: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 5,
        warmup: bool = False,
        teacher_memory_format: MemoryFormatChoice = "auto",
        fold_batchnorm: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        self.decay = check_real("decay", decay, minimum=0.0, maximum=1.0)
        self.lam = check_real("lam", lam, minimum=0.0)
        self.tau = check_real("tau", tau, minimum=0.0, exclusive_minimum=True)
        self.start_epoch = check_int("start_epoch", start_epoch)
        check_choice("teacher_memory_format", teacher_memory_format, MEMORY_FORMATS)
        self.model = model
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.epoch = 0
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.teacher_memory_format = _resolve_memory_format(teacher_memory_format, self.teacher)
        if self.teacher_memory_format is not None:
            self.teacher.to(memory_format=self.teacher_memory_format)
        self.fold_batchnorm = bool(fold_batchnorm)
        self._folded = _FoldedTeacher.build(self.teacher) if self.fold_batchnorm else None

    @property
    def active(self) -> bool:
        """Whether the current epoch adds the term (``epoch > start_epoch``)."""
        return self.epoch > self.start_epoch

    @property
    def memory_bytes(self) -> int:
        """Bytes of the teacher's parameters and buffers and of its folded weights."""
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]
        folded = self._folded.memory_bytes if self._folded is not None else 0
        return folded + sum(t.numel() * t.element_size() for t in tensors)

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch; call it at the start of every epoch."""
        self.epoch = check_int("epoch", epoch, minimum=0)

    def current_decay(self) -> float:
        """``β_t`` for the next update (``t = num_updates + 1``)."""
        if not self.warmup:
            return self.decay
        t = self.num_updates + 1
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def __call__(self, inputs: Any, logits: Tensor) -> Tensor:
        """``λ·τ²·mean KL(softmax(f_v(inputs)/τ) ‖ softmax(logits/τ))``, zero before the start.

        ``inputs`` is passed to the teacher as ``teacher(inputs)``; ``logits`` are the
        student's logits for the same inputs, shape ``(B, C)``.
        """
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(f"expected student logits of shape (B, C), got {_shape(logits)}")
        if not self.active or self.lam == 0:
            return zero_term(logits)
        with torch.no_grad():
            teacher_logits = self.teacher_logits(inputs)
        if not isinstance(teacher_logits, Tensor) or teacher_logits.shape != logits.shape:
            raise ValueError(
                f"expected the teacher's logits to have the student's shape "
                f"{tuple(logits.shape)}, got {_shape(teacher_logits)}"
            )
        return self.lam * tempered_kl(logits, teacher_logits, self.tau)

    @torch.no_grad()
    def teacher_logits(self, inputs: Any) -> Any:
        """The eval-mode teacher's output for ``inputs``, through the folded forward if any."""
        self.teacher.eval()
        if self._folded is None or _has_forward_hooks(self.teacher):
            return self.teacher(inputs)
        if not self._folded.matches(self.teacher):  # tensors replaced, e.g. by .to(device)
            self._folded = _FoldedTeacher.build(self.teacher)
            if self._folded is None:
                return self.teacher(inputs)
        return self._folded(inputs)

    @torch.no_grad()
    def update(self) -> None:
        """Move the teacher one EMA step towards the student; call after each optimizer step."""
        decay = self.current_decay()
        lerp_teacher, lerp_student, copy_teacher, copy_student = [], [], [], []
        pairs = [
            *zip(self.teacher.parameters(), self.model.parameters(), strict=True),
            *zip(self.teacher.buffers(), self.model.buffers(), strict=True),
        ]
        for mine, theirs in pairs:
            if mine.is_floating_point():
                lerp_teacher.append(mine)
                lerp_student.append(theirs.detach())
            else:
                copy_teacher.append(mine)
                copy_student.append(theirs)
        if lerp_teacher:
            torch._foreach_lerp_(lerp_teacher, lerp_student, 1.0 - decay)
        if copy_teacher:
            torch._foreach_copy_(copy_teacher, copy_student)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Teacher weights and buffers, the update count, the epoch and the settings.

        Tensors are references, as in ``nn.Module.state_dict``.
        """
        return {
            "teacher": self.teacher.state_dict(),
            "num_updates": self.num_updates,
            "epoch": self.epoch,
            "decay": self.decay,
            "lam": self.lam,
            "tau": self.tau,
            "start_epoch": self.start_epoch,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s contents (the teacher must have the same layout)."""
        require_keys(state, _STATE_KEYS, "MESA")
        self.teacher.load_state_dict(state["teacher"])
        self.num_updates = int(state["num_updates"])
        self.epoch = int(state["epoch"])
        self.decay = float(state["decay"])
        self.lam = float(state["lam"])
        self.tau = float(state["tau"])
        self.start_epoch = int(state["start_epoch"])
        self.warmup = bool(state["warmup"])

    def __repr__(self) -> str:
        return (
            f"MESA(decay={self.decay}, lam={self.lam}, tau={self.tau}, "
            f"start_epoch={self.start_epoch}, warmup={self.warmup}, "
            f"num_updates={self.num_updates}, epoch={self.epoch}, "
            f"teacher_memory_format={self.teacher_memory_format}, "
            f"fold_batchnorm={self.fold_batchnorm})"
        )


_STATE_KEYS = {"teacher", "num_updates", "epoch", "decay", "lam", "tau", "start_epoch", "warmup"}


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _resolve_memory_format(
    choice: MemoryFormatChoice, teacher: nn.Module
) -> torch.memory_format | None:
    """``"auto"``: channels_last for a CPU teacher with 4-D weights, else the model's."""
    if choice != "auto":
        return choice
    weights = [p for p in teacher.parameters() if p.dim() == 4]
    if weights and all(p.device.type == "cpu" for p in weights):
        return torch.channels_last
    return None


def _has_forward_hooks(module: nn.Module) -> bool:
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


_CONV_NORMS: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Linear: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
}


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


class _FoldedLayer(nn.Module):
    """``norm(layer(x))`` for an eval-mode BatchNorm, as ``layer`` with folded weights.

    Holds the teacher's own ``layer`` and ``norm`` (shared, never copied) and the folded
    ``weight``/``bias`` that :class:`_FoldedTeacher` refreshes. Inputs whose channel axis
    is not the one the norm normalizes (a linear layer on more than 2-D inputs, an
    unbatched convolution) run the two layers as they are.
    """

    def __init__(self, layer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.batched_dim = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def sources(self) -> tuple[Tensor | None, ...]:
        """The tensors the fold reads, looked up afresh (``.to()`` may replace buffers).

        Read from the modules' parameter and buffer dicts: ``nn.Module.__getattr__`` costs
        ~1 µs a call, which adds up over a ResNet's norms at every forward.
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

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.batched_dim or self.weight is None:
            return self.norm(self.layer(x))
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, self.weight, self.bias)
        return self.layer._conv_forward(x, self.weight, self.bias)


class _FoldedTeacher:
    """The teacher's ``torch.fx`` graph with each conv/linear → BatchNorm pair folded.

    Every module call other than the folded pairs goes to the teacher's own submodules, and
    attributes read in ``forward`` are the teacher's own tensors, so the graph always sees
    the current EMA state; only the folded weights are derived, and :meth:`__call__`
    recomputes them when a tensor they come from has a new version or new storage.
    """

    def __init__(self, graph: fx.GraphModule, units: list[_FoldedLayer], teacher: nn.Module):
        self.graph = graph
        self.units = units
        self.teacher = teacher
        self.attributes = [n.target for n in graph.graph.nodes if n.op == "get_attr"]
        self.key: list[tuple[int, int, int]] | None = None

    @classmethod
    def build(cls, teacher: nn.Module) -> _FoldedTeacher | None:
        """Trace and fold ``teacher``; ``None`` when it cannot be traced or has no pair."""
        try:
            graph = fx.symbolic_trace(teacher)
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
            unit = _FoldedLayer(modules[source.target], modules[node.target])
            name = f"_folded_{len(units)}"
            graph.add_submodule(name, unit)
            source.target = name
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
            units.append(unit)
        if not units:
            return None
        _activate_in_place(graph, set(units))
        graph.graph.lint()
        graph.recompile()
        return cls(graph, units, teacher)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the folded weights and biases."""
        return sum(
            (u.layer.weight.numel() + u.layer.weight.shape[0]) * u.layer.weight.element_size()
            for u in self.units
        )

    def matches(self, teacher: nn.Module) -> bool:
        """Whether the tensors the graph reads directly are still ``teacher``'s own.

        Module calls and folds look their tensors up afresh; only ``get_attr`` reads
        (tensors used outside a submodule call, rare) hold references that ``.to()``
        could leave behind.
        """
        return teacher is self.teacher and all(
            _attribute(self.graph, name) is _attribute(teacher, name) for name in self.attributes
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
        """``W' = s·W``, ``b' = s·(b − μ) + β`` with ``s = γ/√(σ² + ε)``, for every pair."""
        layers, norms = [u.layer for u in self.units], [u.norm for u in self.units]
        scales = torch._foreach_add([n.running_var for n in norms], [n.eps for n in norms])
        torch._foreach_rsqrt_(scales)
        affine = [i for i, n in enumerate(norms) if n.weight is not None]
        if affine:
            torch._foreach_mul_([scales[i] for i in affine], [norms[i].weight for i in affine])
        weights = torch._foreach_mul(
            [m.weight for m in layers],
            [s.view((-1,) + (1,) * (m.weight.dim() - 1)) for s, m in zip(scales, layers)],
        )
        biases = [
            -n.running_mean if m.bias is None else m.bias - n.running_mean
            for m, n in zip(layers, norms, strict=True)
        ]
        torch._foreach_mul_(biases, scales)
        if affine:
            torch._foreach_add_([biases[i] for i in affine], [norms[i].bias for i in affine])
        for unit, weight, bias in zip(self.units, weights, biases, strict=True):
            dtype = unit.layer.weight.dtype  # a norm kept in float32 must not promote it
            unit.weight, unit.bias = weight.to(dtype), bias.to(dtype)


_RELU_FUNCTIONS = (torch.relu, nn.functional.relu)


def _activate_in_place(graph: fx.GraphModule, folded: set[nn.Module]) -> None:
    """Rewrite ``relu(folded(x))`` as ``relu_(folded(x))`` where nothing else reads the
    folded layer's output: the teacher runs without autograd and that output is a fresh
    tensor, so the in-place ReLU changes no value and saves an allocation and a pass over
    memory (on a CPU an out-of-place ReLU cost ~30 % of a small CNN's teacher forward)."""
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
