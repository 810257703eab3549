r"""m-sharpness on one process: a SAM step whose ε is taken per sub-batch of size m.

Foret et al. (ICLR 2021, Sec. 4.1) define the m-sharpness of a batch split into
``n = B/m`` disjoint sub-batches ``B_k`` of size ``m``; each gets its own perturbation
and only the surrogate gradients are averaged:

.. math::

    ε_k = ρ\,\frac{∇L_{B_k}(w)}{\lVert ∇L_{B_k}(w)\rVert_2},\qquad
    g = \frac1n \sum_{k=1}^{n} ∇L_{B_k}(w + ε_k),\qquad w ← \mathrm{base\_step}(w, g).

That is what ``n`` processes compute under :func:`flatmin.distributed.sam_step`
with ``m`` samples each — here on one process, sub-batch after sub-batch (the paper's
finding: smaller m generalizes better; ``m = B`` is plain SAM). The two agree to float
rounding when sub-batch ``k`` holds process ``k``'s samples; BatchNorm statistics follow
the same rule as the distributed default (``statistics="mean"``): every sub-batch's
first pass starts from the same running statistics and their results are averaged, so
they move once per step. Usage, a batch of 16 as two sub-batches of 8:

.. test: setup=sam

::

    loss = m_sharpness_step(opt, model, F.cross_entropy, x, y, m=8)

The cost is ``2n`` forward/backward passes on ``m`` samples each (the same work as one
SAM step, in smaller pieces) and one extra copy of the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatmin.distributed.collectives import norm_statistics
from flatmin.distributed.sam import check_two_pass
from flatmin.optim._checks import check_int
from flatmin.optim.bn import running_stats_frozen


def _check(optimizer: Optimizer, inputs: Any, targets: Any, m: Any) -> int:
    check_two_pass(optimizer)
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("expected inputs and targets as tensors batched along dimension 0")
    batch = inputs.shape[0] if inputs.dim() else 0
    if targets.dim() == 0 or targets.shape[0] != batch:
        raise ValueError(
            f"expected inputs and targets with the same batch size, got {tuple(inputs.shape)} "
            f"and {tuple(targets.shape)}"
        )
    check_int("m", m, minimum=1, hint="the sub-batch size")
    if batch == 0 or batch % m:
        raise ValueError(f"expected a batch size that is a positive multiple of m={m}, got {batch}")
    if optimizer.uses_clean_gradient:
        raise ValueError(
            f"{type(optimizer).__name__} uses the first-pass gradient in its update "
            "(uses_clean_gradient), which has no per-sub-batch form here: use SAM, ASAM, "
            "USAM or ESAM without stable=True, or sam_step on several processes"
        )
    if optimizer.per_sample_closure and getattr(optimizer, "gamma", 1.0) < 1:
        raise ValueError(
            f"{type(optimizer).__name__} selects samples with per-sample losses, which "
            "m_sharpness_step's loss_fn does not give: use gamma=1 (weight perturbation "
            "only) or sam_step"
        )
    return batch // m


def m_sharpness_step(
    optimizer: Optimizer,
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    m: int,
) -> Tensor:
    """One SAM-family step with a separate ε for each sub-batch of ``m`` samples.

    Args:
        optimizer: SAM, ASAM, USAM or ESAM with ``gamma=1``. An optimizer whose
            ``uses_clean_gradient`` is True (StableSAM, GSAM, LookSAM) has no
            per-sub-batch form here and is refused, before anything changes.
        model: the model, in training mode.
        loss_fn: ``loss_fn(model(x), y)`` returns the mean loss of a sub-batch.
        inputs, targets: the batch, split along dimension 0 into ``B/m`` sub-batches.
        m: the sub-batch size; must divide the batch size.

    Returns:
        The mean over sub-batches of the first-pass losses (detached).
    """
    count = _check(optimizer, inputs, targets, m)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    stats = norm_statistics(model)
    buffers = list(model.buffers())
    start = torch._foreach_mul(buffers, 1) if buffers else []
    stats_sum = [torch.zeros_like(s) for s in stats]
    surrogate_sum: list[Tensor] | None = None
    losses = []
    optimizer.zero_grad()
    try:
        for k, (x, y) in enumerate(zip(inputs.split(m), targets.split(m))):
            if buffers:
                torch._foreach_copy_(buffers, start)
            with torch.enable_grad():
                loss = loss_fn(model(x), y)
                loss.backward()
            losses.append(loss.detach())
            if stats:
                torch._foreach_add_(stats_sum, stats)
            optimizer.first_step(zero_grad=True)
            with torch.enable_grad(), running_stats_frozen(model):
                (loss_fn(model(x), y) / count).backward()
            grads = [_grad_or_zeros(p) for p in params]
            if k == count - 1:
                if surrogate_sum is not None:
                    torch._foreach_add_(grads, surrogate_sum)
                break
            surrogate_sum = (
                grads if surrogate_sum is None else torch._foreach_add(surrogate_sum, grads)
            )
            optimizer.restore_weights()
            optimizer.zero_grad()
    except BaseException:
        optimizer.abandon_step()
        if buffers:
            torch._foreach_copy_(buffers, start)
        raise
    if stats:
        torch._foreach_div_(stats_sum, count)
        torch._foreach_copy_(stats, stats_sum)
    optimizer.second_step(zero_grad=True)
    return torch.stack(losses).mean()


def _grad_or_zeros(param: Tensor) -> Tensor:
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad
