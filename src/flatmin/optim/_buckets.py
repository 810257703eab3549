r"""Parameters grouped for ``torch._foreach_*`` kernels, and sync-free norms over them.

A :class:`Bucket` holds the parameters of one param group that share a device, a dtype,
an adaptive-scaling rule and a sharding, together with their gradients. Every foreach
kernel of the SAM family runs once per bucket; norms stay tensors so the hot path never
waits for the device.

**Sharded parameters** (``DTensor``, e.g. from FSDP2's ``fully_shard``). The kernels act
on each parameter's *local shard* (``to_local()``, a view of the DTensor's storage), so
ε, the saved copy of ``w`` and the restore stay on the shards, and the base optimizer,
which steps on the DTensors themselves, keeps its state sharded. A sum over a bucket —
a squared norm, a dot product — is then a partial sum; the ``global_*`` reductions add
the partial sums of every bucket and all-reduce them *once* over the process groups of
the mesh dimensions that shard the tensors (not the replicating ones, which would count
every shard twice under HSDP):

.. math::

    \lVert g\rVert^2 = \sum_{\text{plain } t} \lVert t\rVert^2
    + \operatorname{all\_reduce}\Big(\sum_{\text{local shards } s} \lVert s\rVert^2\Big)

one all-reduce of a scalar (three numbers for GSAM) per norm, never a gather of
gradients. A per-tensor port that takes each rank's norm over its own shard gets a
different ε on every rank, without any error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

#: The process groups over which a bucket's local shards partition its tensors (one per
#: sharded mesh dimension); empty for tensors that every rank holds whole.
ShardGroups = tuple


@dataclass
class Bucket:
    """Parameters of ``group`` on one device, dtype and sharding; ``scaled`` marks ASAM
    weights.

    ``owners`` are the parameters as the base optimizer sees them; ``params`` and
    ``grads`` are what the foreach kernels act on — the tensors themselves, or the local
    shards of DTensor parameters (views of their storage). ``shards`` are the process
    groups over which sums of this bucket are all-reduced (see :data:`ShardGroups`).
    """

    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    scaled: bool
    owners: list[Tensor] = field(default_factory=list)
    shards: ShardGroups = ()

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def refresh_grads(self) -> None:
        """Re-read ``p.grad`` (a backward pass may have replaced the tensors)."""
        self.grads = [local_part(_grad_of(p)) for p in self.owners]


def _dtensor_type() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` is loaded — no DTensor can exist
    otherwise, and importing it would slow down ``import flatmin`` by half a second."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local_part(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view of its storage), any other tensor itself."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.to_local()
    return tensor


def shard_groups_of(tensor: Tensor) -> ShardGroups:
    """The process groups of the mesh dimensions that shard the DTensor ``tensor`` (empty
    for a plain tensor or a replicated DTensor)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return ()
    if any(placement.is_partial() for placement in tensor.placements):
        raise ValueError(
            "the SAM family steps on whole or sharded tensors; got a DTensor with a Partial "
            f"placement {tensor.placements} (reduce it first, e.g. with .redistribute())"
        )
    mesh = tensor.device_mesh
    return tuple(
        mesh.get_group(dim)
        for dim, placement in enumerate(tensor.placements)
        if placement.is_shard()
    )


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
            shards = shard_groups_of(p)
            key = (p.device, p.dtype, scaled, shards)
            bucket = by_key.get(key)
            if bucket is None:
                bucket = by_key[key] = Bucket(group, [], [], scaled, [], shards)
            bucket.params.append(local_part(p))
            bucket.grads.append(local_part(p.grad))
            bucket.owners.append(p)
        buckets.extend(by_key.values())
    return buckets


def squared_norm(tensors: list[Tensor]) -> Tensor:
    """``Σ‖t‖²`` over a list of same-device tensors, in float32 at least."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(norms).square().sum()


def shards_of(buckets: list[Bucket]) -> list[ShardGroups]:
    """Each bucket's :attr:`Bucket.shards`, for the ``global_*`` reductions."""
    return [b.shards for b in buckets]


def global_sum(parts: list[Tensor], shards: list[ShardGroups], device: torch.device) -> Tensor:
    """``Σ_b parts[b]`` over every rank, where ``parts[b]`` holds partial sums over the
    tensors of bucket ``b`` (any shape, the same for all) and ``shards[b]`` its shard
    groups: the parts of sharded buckets are added up and all-reduced once per distinct
    set of shard groups (once per call under FSDP), the others are whole already.
    Asynchronous on the host; on one process or without sharding, no collective."""
    whole: list[Tensor] = []
    sharded: dict[ShardGroups, list[Tensor]] = {}
    for part, groups in zip(parts, shards):
        part = part.to(device, non_blocking=True)
        (sharded.setdefault(groups, []) if groups else whole).append(part)
    total = torch.stack(whole).sum(0) if whole else None
    for groups, same in sharded.items():
        partial = torch.stack(same).sum(0)
        for group in groups:
            dist.all_reduce(partial, group=group)
        total = partial if total is None else total + partial
    return total


def global_norm(
    per_bucket: list[list[Tensor]],
    device: torch.device,
    shards: list[ShardGroups] | None = None,
) -> Tensor:
    """``sqrt(Σ_b Σ_t ‖t‖²)`` over lists that may live on different devices; ``shards``
    (one entry per list, :func:`shards_of`) makes it global over sharded tensors."""
    shards = shards or [()] * len(per_bucket)
    pairs = [(squared_norm(ts), s) for ts, s in zip(per_bucket, shards) if ts]
    if not pairs:
        return torch.zeros((), device=device)
    parts, groups = zip(*pairs)
    return global_sum(list(parts), list(groups), device).sqrt()


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``Σ_t ⟨a_t, b_t⟩`` over one bucket's tensors (float32 at least)."""
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    return torch.stack(
        [torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]
    ).sum()


def global_dot(
    a: list[list[Tensor]],
    b: list[list[Tensor]],
    device: torch.device,
    shards: list[ShardGroups] | None = None,
) -> Tensor:
    """``Σ_b ⟨a_b, b_b⟩`` over per-bucket lists that may live on different devices;
    ``shards`` as for :func:`global_norm`."""
    return _global_sum_over(dot, a, b, device, shards, ())


def global_dot_and_norm(
    a: list[list[Tensor]],
    b: list[list[Tensor]],
    device: torch.device,
    shards: list[ShardGroups] | None = None,
) -> Tensor:
    """``[⟨a, b⟩, ‖b‖²]`` over per-bucket lists, in one reduction (one all-reduce of two
    numbers for sharded tensors); ``shards`` as for :func:`global_norm`."""
    return _global_sum_over(
        lambda x, y: torch.stack([dot(x, y), squared_norm(y)]), a, b, device, shards, (2,)
    )


def _global_sum_over(
    per_bucket: Callable[[list[Tensor], list[Tensor]], Tensor],
    a: list[list[Tensor]],
    b: list[list[Tensor]],
    device: torch.device,
    shards: list[ShardGroups] | None,
    shape: tuple[int, ...],
) -> Tensor:
    shards = shards or [()] * len(a)
    pairs = [(per_bucket(x, y), s) for x, y, s in zip(a, b, shards) if x]
    if not pairs:
        return torch.zeros(shape, device=device)
    parts, groups = zip(*pairs)
    return global_sum(list(parts), list(groups), device)


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
    buckets = make_buckets(param_groups, adaptive_rule=False)
    norm = global_norm([b.grads for b in buckets], device, shards_of(buckets))
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
