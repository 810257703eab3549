"""MESA: the memory-efficient SAF variant with an EMA teacher (Du et al., NeurIPS 2022)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flatmin.optim._buckets import local_part
from flatmin.optim._checks import check_choice, check_int, check_real
from flatmin.trajectory.ema import EMA
from flatmin.trajectory.fold import FoldedForward, has_forward_hooks
from flatmin.trajectory.kl import tempered_kl, zero_term

MemoryFormatChoice = torch.memory_format | Literal["auto"] | None
MEMORY_FORMATS = (
    "auto",
    None,
    torch.contiguous_format,
    torch.channels_last,
    torch.channels_last_3d,
)
DEFAULT_DECAY = 0.9998


class MESA(nn.Module):
    r"""Memory-Efficient Sharpness-Aware training: distil from an EMA of your own weights.

    Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022, Sec. "MESA". SAF's store
    of past outputs is replaced by a teacher whose weights are an exponential moving
    average of the student's, updated after every optimizer step (:class:`~flatmin.trajectory.EMA`):

    .. math::
        v_t = β_t·v_{t-1} + (1-β_t)·θ_t,\qquad v_0 = θ_0,

    and the loss is ``CE(z, y) + λ·τ²·mean_i KL(softmax(f_v(x_i)/τ) ‖ softmax(z_i/τ))``
    (:func:`~flatmin.trajectory.tempered_kl`) with the teacher in eval mode, run without
    autograd. Usage (``set_epoch`` at the start of every epoch: without it the term stays
    0.0):

    .. test: setup=sgd check="mesa.active"

    ::

        mesa = MESA(model)
        for epoch in range(epochs):
            mesa.set_epoch(epoch)
            for x, y in loader:
                logits = model(x)
                loss = F.cross_entropy(logits, y) + mesa(x, logits)
                opt.zero_grad(); loss.backward(); opt.step()
                mesa.update()

    The EMA averages BatchNorm buffers too and moves from the first step on. It starts at
    ``θ_0`` where the paper sets ``v_1 = θ_1``, a difference that fades as ``β^t``. At
    ``β = 0.9998`` its memory is ~5,000 steps, so short runs want ``warmup=True``.

    **Counting epochs** is the same as :class:`flatmin.SAF`'s: 0-based ``set_epoch``, the
    term is active when ``epoch > start_epoch`` (official code); before that ``mesa(x, z)``
    returns an exact zero attached to ``z``'s graph without running the teacher.

    **The teacher: built, or yours.** By default MESA builds an :class:`~flatmin.trajectory.EMA` of ``model``
    (``mesa.ema``; the teacher network is ``mesa.teacher``) and :meth:`update` moves it. If
    you already keep an EMA (``flatmin.trajectory.EMA``, timm's ``ModelEmaV3``, torch's
    ``AveragedModel``: anything holding the averaged network as ``.module``, or that
    network itself), pass it as ``teacher=`` and MESA reads it instead of holding a second
    copy. Its owner keeps updating it as before (``ema.update(model)``) with its own
    decay, so MESA refuses ``decay`` and ``warmup`` then, and :meth:`update` raises: the
    average never moves twice per step. MESA neither registers nor saves a teacher it did
    not build.

    **A module whose only submodule is the teacher.** MESA follows ``.to()``, dtype casts
    and a parent module's ``state_dict``; it holds the student by a plain reference (the
    student belongs to whoever trains it). Its ``state_dict`` is torch's (``ema.module.*``
    plus the settings and counters as extra state); ``load_state_dict`` checks every key
    and shape before it changes anything, and resuming is bit-exact.

    **The teacher's fast forward.** A built CPU teacher with 4-D weights is laid out
    channels-last (``teacher_memory_format="auto"``), and eval-mode BatchNorms that follow
    a convolution or linear layer are folded into it (``flatmin.trajectory.fold``); the
    EMA weights stay the state, and the logits equal the plain eval forward up to float
    rounding. The paper reports ~15 % lower throughput for this extra forward; the figures
    on a CPU are in ``benchmarks/RESULTS.md``.

    **A forgotten** :meth:`update`. If ``mesa(x, logits)`` was called during an epoch but
    :meth:`update` was not (a teacher stuck at the initial weights), MESA warns once,
    naming ``mesa.update()``; it checks at :meth:`set_epoch` and :meth:`state_dict` (on the
    host: counters, no device sync). It cannot tell a teacher you forgot to update from
    one you keep fixed, so a ``teacher=`` given by you is never checked.

    Args:
        model: the student.
        decay: ``β`` of the built EMA (0.9998 in the official code; the paper uses
            ``β ∈ (0.9, 1)``).
        lam: ``λ`` (0.8).
        tau: temperature ``τ`` (5).
        start_epoch: ``E_start`` (5).
        warmup: the built EMA's decay warm-up ``β_t = min(β, (1 + t)/(10 + t))``.
        teacher_memory_format: lay the teacher's 4-D weights out in this memory format
            (e.g. ``torch.channels_last``); ``None`` keeps them as they are; ``"auto"``
            (default) picks ``torch.channels_last`` for a built teacher with 4-D weights
            on the CPU and keeps the layout elsewhere (on GPUs the better layout depends
            on dtype and hardware) and for a teacher you pass. Values, device and dtype
            are unchanged.
        fold_batchnorm: run the teacher with its eval-mode BatchNorms folded (above);
            ``False`` runs :attr:`teacher` as it is and holds no folded weights.
        teacher: an EMA you keep and update yourself (above); ``None`` builds one.
    """

    ema: EMA | None

    def __init__(
        self,
        model: nn.Module,
        decay: float = DEFAULT_DECAY,
        lam: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 5,
        warmup: bool = False,
        teacher_memory_format: MemoryFormatChoice = "auto",
        fold_batchnorm: bool = True,
        *,
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"expected the student model as an nn.Module, got {type(model).__name__}"
            )
        self.lam = check_real("lam", lam, minimum=0.0)
        self.tau = check_real("tau", tau, minimum=0.0, exclusive_minimum=True)
        self.start_epoch = check_int("start_epoch", start_epoch)
        check_choice("teacher_memory_format", teacher_memory_format, MEMORY_FORMATS)
        self.fold_batchnorm = bool(fold_batchnorm)
        self.epoch = 0
        self.__dict__["_student"] = model  # a plain reference: not a submodule of MESA
        if teacher is None:
            self.ema = EMA(model, decay, warmup)
            network = self.ema.module
        else:
            if decay != DEFAULT_DECAY or warmup:
                raise ValueError(
                    "decay and warmup set the EMA that MESA builds; with teacher= given, "
                    "the teacher's owner updates it with its own decay"
                )
            network = _teacher_network(teacher)
            if network is model:
                raise ValueError("expected the teacher to be an average of model, not model itself")
            self.ema = None
            self.__dict__["_given_teacher"] = network  # the owner's, not registered here
        self.teacher_memory_format = _resolve_memory_format(
            teacher_memory_format, network, built=teacher is None
        )
        if self.teacher_memory_format is not None:
            network.to(memory_format=self.teacher_memory_format)
        self._fast = FoldedForward.build(network.eval()) if self.fold_batchnorm else None
        self._calls_this_epoch = 0
        self._updates_this_epoch = 0
        self._warned_update = False

    @property
    def model(self) -> nn.Module:
        """The student; not a submodule, so ``mesa.to()`` does not move it."""
        return self._student

    @property
    def teacher(self) -> nn.Module:
        """The teacher network, the built EMA's ``.module`` or the one you passed."""
        return self.ema.module if self.ema is not None else self._given_teacher

    @property
    def updates_teacher(self) -> bool:
        """Whether :meth:`update` moves the teacher (MESA built it)."""
        return self.ema is not None

    @property
    def active(self) -> bool:
        """Whether the current epoch adds the term (``epoch > start_epoch``)."""
        return self.epoch > self.start_epoch

    @property
    def memory_bytes(self) -> int:
        """The bytes MESA adds on this process, the built teacher's parameters and buffers
        (their local shards for a sharded teacher; none for a teacher you pass) and the
        folded weights."""
        folded = self._fast.memory_bytes if self._fast is not None else 0
        if self.ema is None:
            return folded
        tensors = [local_part(t) for t in (*self.teacher.parameters(), *self.teacher.buffers())]
        return folded + sum(t.numel() * t.element_size() for t in tensors)

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch; call it at the start of every epoch."""
        epoch = check_int("epoch", epoch, minimum=0)
        self._check_updates()
        if epoch != self.epoch:
            self._calls_this_epoch = self._updates_this_epoch = 0
        self.epoch = epoch

    def forward(self, inputs: Any, logits: Tensor) -> Tensor:
        """``λ·τ²·mean KL(softmax(f_v(inputs)/τ) ‖ softmax(logits/τ))``, zero before the start.

        ``inputs`` is passed to the teacher as ``teacher(inputs)``; ``logits`` are the
        student's logits for the same inputs, shape ``(B, C)``.
        """
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(f"expected student logits of shape (B, C), got {_shape(logits)}")
        self._calls_this_epoch += 1
        if not self.active or self.lam == 0:
            return zero_term(logits)
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
        teacher = self.teacher.eval()
        if self._fast is None or has_forward_hooks(teacher):
            return teacher(inputs)
        if not self._fast.matches(teacher):  # tensors replaced, e.g. by .to(device)
            self._fast = FoldedForward.build(teacher)
            if self._fast is None:
                return teacher(inputs)
        return self._fast(inputs)

    def update(self) -> None:
        """Move the teacher one EMA step towards the student; call after each optimizer step."""
        if self.ema is None:
            raise RuntimeError(
                "this MESA reads the teacher you passed and does not update it: update that "
                "EMA after each optimizer step (e.g. ema.update(model)) instead"
            )
        self.ema.update(self._student)
        self._updates_this_epoch += 1

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """torch's ``state_dict``: the built EMA's tensors (references, not copies) and, as
        extra state, the epoch, the settings and the EMA's update count."""
        self._check_updates()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """torch's ``load_state_dict``, after checking every key, shape and extra state
        first, so that a wrong state changes nothing."""
        _check_loadable(nn.Module.state_dict(self), state_dict, strict)
        result = super().load_state_dict(state_dict, strict, assign)
        self._calls_this_epoch = self._updates_this_epoch = 0
        return result

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "lam": self.lam,
            "tau": self.tau,
            "start_epoch": self.start_epoch,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "lam", "tau", "start_epoch"} - set(state)
        if missing:
            raise ValueError(f"expected MESA's extra state to hold {sorted(missing)} too")
        self.epoch = check_int("epoch", state["epoch"], minimum=0)
        self.lam = check_real("lam", state["lam"], minimum=0.0)
        self.tau = check_real("tau", state["tau"], minimum=0.0, exclusive_minimum=True)
        self.start_epoch = check_int("start_epoch", state["start_epoch"])

    def _check_updates(self) -> None:
        """Warn once if the term was called during this epoch but the EMA never moved."""
        if (
            self.ema is None
            or self._warned_update
            or not self._calls_this_epoch
            or self._updates_this_epoch
        ):
            return
        self._warned_update = True
        warnings.warn(
            f"MESA: mesa(inputs, logits) was called {self._calls_this_epoch} times in epoch "
            f"{self.epoch} but mesa.update() not once, so the EMA teacher did not move: call "
            "mesa.update() after every optimizer step",
            RuntimeWarning,
            stacklevel=3,
        )

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, tau={self.tau}, start_epoch={self.start_epoch}, "
            f"epoch={self.epoch}, teacher_memory_format={self.teacher_memory_format}, "
            f"fold_batchnorm={self.fold_batchnorm}, updates_teacher={self.updates_teacher}"
        )


def _teacher_network(teacher: Any) -> nn.Module:
    """The averaged network of an EMA wrapper (``.module``), or ``teacher`` itself."""
    inner = getattr(teacher, "module", None)
    is_wrapper = isinstance(teacher, EMA) or any(
        callable(getattr(teacher, name, None)) for name in ("update", "update_parameters")
    )
    if isinstance(inner, nn.Module) and is_wrapper:
        return inner
    if isinstance(teacher, nn.Module):
        return teacher
    raise TypeError(
        "expected teacher to be an EMA holding the averaged network as .module "
        "(flatmin.trajectory.EMA, timm's ModelEmaV3, torch's AveragedModel) or that "
        f"network itself, got {type(teacher).__name__}"
    )


def _resolve_memory_format(
    choice: MemoryFormatChoice, teacher: nn.Module, built: bool
) -> torch.memory_format | None:
    """``"auto"``: channels_last for a built CPU teacher with 4-D weights, else unchanged."""
    if choice != "auto":
        return choice
    weights = [p for p in teacher.parameters() if p.dim() == 4]
    if built and weights and all(p.device.type == "cpu" for p in weights):
        return torch.channels_last
    return None


def _check_loadable(expected: Mapping[str, Any], state: Mapping[str, Any], strict: bool) -> None:
    """Raise a ValueError unless ``state`` has ``expected``'s keys, shapes and extra states."""
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a MESA state_dict (a mapping), got {type(state).__name__}")
    if strict:
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(
                f"expected a MESA state_dict with the keys {_few(expected)}; "
                f"missing {_few(missing)}, unexpected {_few(unexpected)}"
            )
    for key in expected.keys() & state.keys():
        mine, theirs = expected[key], state[key]
        if isinstance(mine, Tensor):
            if not isinstance(theirs, Tensor) or theirs.shape != mine.shape:
                raise ValueError(
                    f"expected {key} of shape {tuple(mine.shape)}, got {_shape(theirs)}"
                )
        elif not isinstance(theirs, Mapping) or theirs.keys() != mine.keys():
            raise ValueError(
                f"expected {key} to be a dict with keys {sorted(mine)}, got {theirs!r}"
            )


def _few(keys: Any) -> str:
    names = sorted(keys)
    return str(names) if len(names) <= 4 else f"[{', '.join(map(repr, names[:4]))}, …]"


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__
