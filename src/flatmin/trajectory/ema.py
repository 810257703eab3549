"""An exponential moving average of a model's weights and buffers, as an ``nn.Module``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from flatmin.optim._buckets import local_part
from flatmin.optim._checks import check_int, check_real


class EMA(nn.Module):
    r"""A copy of ``model`` whose floating-point tensors follow an exponential moving average.

    .. math::
        v_t = β_t·v_{t-1} + (1-β_t)·θ_t,\qquad v_0 = θ_0,

    over every parameter *and* floating-point buffer (BatchNorm's running mean and
    variance included, as the MESA paper's EMA averages them), one ``torch._foreach_lerp_``
    for all of them; integer buffers (``num_batches_tracked``) are copied. ``module``
    starts as a deep copy of ``model`` (same device, dtype and layout, no shared storage,
    ``requires_grad=False``) and stays in eval mode: ``ema.train()`` leaves it there.

    **Sharded models** (FSDP2's ``fully_shard``, whose models cannot be deep-copied): build
    the EMA from the plain model, then shard ``module`` exactly as the model; the
    update then runs on each process's local shards (``DTensor.to_local()``), so no
    process holds a whole copy.

    Being a module, the average follows ``.to()``, dtype casts and the ``state_dict`` of a
    parent module it is assigned to; its state is the averaged tensors plus
    ``num_updates``, ``decay`` and ``warmup`` (``get_extra_state``). Usage:

    .. test: setup=sgd

    ::

        ema = EMA(model, decay=0.999)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            ema.update(model)
        logits = ema(x)                          # the averaged model (ema.module), eval mode

    **Decay warm-up.** With ``warmup=True`` the ``t``-th update (``t = 1, 2, …``) uses
    ``β_t = min(decay, (1 + t)/(10 + t))`` (the ``num_updates`` form of TensorFlow's
    ``ExponentialMovingAverage``): ``β_1 = 2/11``, and the full ``decay`` applies after
    ``t ≥ (10·decay − 1)/(1 − decay)`` updates (44,991 for 0.9998). Without it
    ``β_t = decay``.

    Args:
        model: the model to average (the student).
        decay: ``β`` in ``[0, 1]``.
        warmup: use the decay warm-up above.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module to average, got {type(model).__name__}")
        self.decay = check_real("decay", decay, minimum=0.0, maximum=1.0)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """``β_t`` for the next update (``t = num_updates + 1``)."""
        if not self.warmup:
            return self.decay
        t = self.num_updates + 1
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model`` (the model it was built from)."""
        decay = self.current_decay()
        lerp_mine, lerp_theirs, copy_mine, copy_theirs = [], [], [], []
        pairs = [
            *zip(self.module.parameters(), model.parameters(), strict=True),
            *zip(self.module.buffers(), model.buffers(), strict=True),
        ]
        for mine, theirs in pairs:
            mine, theirs = local_part(mine), local_part(theirs.detach())
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"the EMA holds a tensor of shape {tuple(mine.shape)} where the model "
                    f"has {tuple(theirs.shape)}: pass the model the EMA was built from; if "
                    "both are sharded by FSDP2, a forward without a backward has left one "
                    "of them gathered (call .reshard() on its FSDP modules first)"
                )
            if mine.is_floating_point():
                lerp_mine.append(mine)
                lerp_theirs.append(theirs)
            else:
                copy_mine.append(mine)
                copy_theirs.append(theirs)
        if lerp_mine:
            torch._foreach_lerp_(lerp_mine, lerp_theirs, 1.0 - decay)
        if copy_mine:
            torch._foreach_copy_(copy_mine, copy_theirs)
        self.num_updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged model's forward."""
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> EMA:
        """Set this wrapper's flag only: the average itself always runs in eval mode."""
        self.training = mode
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        missing = {"num_updates", "decay", "warmup"} - set(state)
        if missing:
            raise ValueError(
                f"expected an EMA state with num_updates, decay and warmup; missing {sorted(missing)}"
            )
        self.num_updates = check_int("num_updates", state["num_updates"], minimum=0)
        self.decay = check_real("decay", state["decay"], minimum=0.0, maximum=1.0)
        self.warmup = bool(state["warmup"])

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warmup={self.warmup}, num_updates={self.num_updates}"
