"""Parameters grouped for ``torch._foreach_*`` kernels, and sync-free norms over them.

A :class:`Bucket` holds the parameters of one param group that share a device, a dtype
and an adaptive-scaling rule, together with their gradients. Every foreach kernel of
the SAM family runs once per bucket; norms stay tensors so the hot path never waits
for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Bucket:
    """Parameters of ``group`` on one device and dtype; ``scaled`` marks ASAM weights."""

    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    scaled: bool

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def refresh_grads(self) -> None:
        """Re-read ``p.grad`` (a backward pass may have replaced the tensors)."""
        self.grads = [_grad_of(p) for p in self.params]


def _grad_of(param: Tensor) -> Tensor:
    grad = param.grad
    if grad is None:
        # A parameter with a gradient in the first pass but none in the second: its
        # surrogate gradient is zero, as autograd would have accumulated nothing.
        grad = param.grad = torch.zeros_like(param)
    return grad


def is_adaptive_weight(param: Tensor, name: str | None) -> bool:
    """The official ASAM rule (Kwon et al., ICML 2021; ``SamsungLabs/ASAM``): a parameter
    whose name contains ``weight`` is scaled by ``T_w = |w| + η``, every other one is not.

    So linear, convolution and norm-layer weights are scaled; biases, attention's
    ``in_proj_bias``, class tokens, position embeddings, LayerScale ``gamma`` and
    relative-position bias tables are not. Without names (``model.parameters()``),
    tensors of two or more dimensions count as weights.
    """
    if name is not None:
        return "weight" in name
    return param.ndim > 1


def make_buckets(param_groups: list[dict], adaptive_rule: bool = True) -> list[Bucket]:
    """Buckets of the parameters that currently hold a gradient."""
    buckets: list[Bucket] = []
    for group in param_groups:
        adaptive = group.get("adaptive")
        names = group.get("param_names")
        by_key: dict[tuple, Bucket] = {}
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("the SAM family does not support sparse gradients")
            scaled = adaptive is not None and (
                adaptive == "all"
                or not adaptive_rule
                or is_adaptive_weight(p, names[i] if names else None)
            )
            key = (p.device, p.dtype, scaled)
            bucket = by_key.get(key)
            if bucket is None:
                bucket = by_key[key] = Bucket(group, [], [], scaled)
            bucket.params.append(p)
            bucket.grads.append(p.grad)
        buckets.extend(by_key.values())
    return buckets


def squared_norm(tensors: list[Tensor]) -> Tensor:
    """``Σ‖t‖²`` over a list of same-device tensors, in float32 at least."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(norms).square().sum()


def global_norm(per_bucket: list[list[Tensor]], device: torch.device) -> Tensor:
    """``sqrt(Σ_b Σ_t ‖t‖²)`` over lists that may live on different devices."""
    parts = [squared_norm(ts).to(device, non_blocking=True) for ts in per_bucket if ts]
    if not parts:
        return torch.zeros((), device=device)
    return torch.stack(parts).sum().sqrt()


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``Σ_t ⟨a_t, b_t⟩`` over one bucket's tensors (float32 at least)."""
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    return torch.stack(
        [torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]
    ).sum()


def global_dot(a: list[list[Tensor]], b: list[list[Tensor]], device: torch.device) -> Tensor:
    """``Σ_b ⟨a_b, b_b⟩`` over per-bucket lists that may live on different devices."""
    parts = [dot(x, y).to(device, non_blocking=True) for x, y in zip(a, b) if x]
    if not parts:
        return torch.zeros((), device=device)
    return torch.stack(parts).sum()


def adaptive_scale(bucket: Bucket) -> list[Tensor]:
    """ASAM's ``T_w = |w| + η`` for a bucket of scaled parameters (η from its group)."""
    scale = torch._foreach_abs(bucket.params)
    eta = bucket.group["eta"]
    if eta:
        torch._foreach_add_(scale, eta)
    return scale


def weighted(bucket: Bucket, tensors: list[Tensor]) -> list[Tensor]:
    """``T ⊙ t`` for a bucket of ASAM-scaled parameters, ``t`` itself otherwise."""
    if not bucket.scaled:
        return tensors
    return torch._foreach_mul(tensors, adaptive_scale(bucket))


def scale_gradients_(param_groups: list[dict], factor: Tensor) -> None:
    """Multiply every gradient of ``param_groups`` by the scalar tensor ``factor``."""
    for b in make_buckets(param_groups, adaptive_rule=False):
        torch._foreach_mul_(b.grads, factor.to(b.device, b.grads[0].dtype))


def clip_gradients_(param_groups: list[dict], max_norm: float, device: torch.device) -> None:
    """Scale every gradient so that their global L2 norm is at most ``max_norm``."""
    norm = global_norm([b.grads for b in make_buckets(param_groups, adaptive_rule=False)], device)
    scale_gradients_(param_groups, torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def mark_nonfinite_(buckets: list[Bucket], finite: Tensor) -> None:
    """Make a GradScaler see a non-finite first pass: one NaN per device unless
    ``finite`` (a boolean tensor) is true."""
    seen: set[torch.device] = set()
    for b in buckets:
        if b.device not in seen:
            seen.add(b.device)
            poison = torch.where(finite, 1.0, float("nan")).to(b.device, b.grads[0].dtype)
            b.grads[0].mul_(poison)
