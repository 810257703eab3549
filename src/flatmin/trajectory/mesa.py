"""MESA: the memory-efficient SAF variant with an EMA teacher (Du et al., NeurIPS 2022)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from flatmin.trajectory.kl import tempered_kl, zero_term


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

    **Cost.** One extra forward pass in eval mode and one copy of the weights and buffers
    (:attr:`memory_bytes`); the paper reports ~15 % lower throughput and 98 MB for ResNet-50
    on GPUs. The throughput share is ``step / (step + teacher forward)``, so it depends on
    how expensive a forward is relative to a training step on the hardware at hand.

    Args:
        model: the student; the teacher is a deep copy of it.
        decay: ``β`` (0.9998 in the official code; the paper uses ``β ∈ (0.9, 1)``).
        lam: ``λ`` (0.8).
        tau: temperature ``τ`` (5).
        start_epoch: ``E_start`` (5).
        warmup: use the decay warm-up above.
        teacher_memory_format: lay the teacher's 4-D weights out in this memory format
            (e.g. ``torch.channels_last``); ``None`` keeps the model's. Values, device and
            dtype are unchanged, only the teacher's forward kernels differ: on a CPU,
            a channels_last teacher ran its forward ~2× faster for an NCHW CNN in
            ``benchmarks/trajectory_cost.py``.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        lam: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 5,
        warmup: bool = False,
        teacher_memory_format: torch.memory_format | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"expected decay in [0, 1], got {decay}")
        if not lam >= 0:
            raise ValueError(f"expected lam >= 0, got {lam}")
        if not tau > 0:
            raise ValueError(f"expected tau > 0, got {tau}")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int):
            raise ValueError(f"expected an int start_epoch, got {start_epoch!r}")
        self.model = model
        self.decay = float(decay)
        self.lam = float(lam)
        self.tau = float(tau)
        self.start_epoch = start_epoch
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.epoch = 0
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if teacher_memory_format is not None:
            self.teacher.to(memory_format=teacher_memory_format)

    @property
    def active(self) -> bool:
        """Whether the current epoch adds the term (``epoch > start_epoch``)."""
        return self.epoch > self.start_epoch

    @property
    def memory_bytes(self) -> int:
        """Bytes of the teacher's parameters and buffers (the extra memory MESA needs)."""
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch; call it at the start of every epoch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"expected a non-negative int epoch, got {epoch!r}")
        self.epoch = epoch

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
        self.teacher.eval()
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if not isinstance(teacher_logits, Tensor) or teacher_logits.shape != logits.shape:
            raise ValueError(
                f"expected the teacher's logits to have the student's shape "
                f"{tuple(logits.shape)}, got {_shape(teacher_logits)}"
            )
        return self.lam * tempered_kl(logits, teacher_logits, self.tau)

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
        missing = _STATE_KEYS - state.keys()
        if missing:
            raise ValueError(
                f"expected a MESA state with keys {sorted(_STATE_KEYS)}; missing {sorted(missing)}"
            )
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
            f"num_updates={self.num_updates}, epoch={self.epoch})"
        )


_STATE_KEYS = {"teacher", "num_updates", "epoch", "decay", "lam", "tau", "start_epoch", "warmup"}


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__
