"""Parameter-shaped scratch buffers that the SAM family reuses from step to step.

The copy of ``w`` kept between the two passes and the clean gradient kept by GSAM and
LookSAM are as large as the model; allocating them afresh every step costs page faults
on the CPU (``benchmarks/RESULTS.md``, GSAM, LookSAM and ESAM cost). They are allocated
once per slot and reused while the parameters that have gradients stay the same. Each
bucket's buffers are views of one flat tensor, for whole-bucket operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatmin.optim._buckets import Bucket


class ReusableBuffers:
    """Named slots of buffers shaped like the buckets' parameters; never checkpointed."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[list[tuple[int, ...]], list[list[Tensor]], list[Tensor]]] = {}

    def get(self, slot: str, buckets: list[Bucket]) -> list[list[Tensor]]:
        """One buffer per parameter of each bucket (contents undefined until written)."""
        # Keyed on the parameters themselves: a DTensor's local view is a new object on
        # every call, so its id says nothing.
        key = [tuple(id(p) for p in b.owners) for b in buckets]
        if slot not in self._slots or self._slots[slot][0] != key:
            flats, views = [], []
            for b in buckets:
                sizes = [p.numel() for p in b.params]
                flat = torch.empty(sum(sizes), dtype=b.params[0].dtype, device=b.device)
                flats.append(flat)
                views.append([v.view(p.shape) for v, p in zip(flat.split(sizes), b.params)])
            self._slots[slot] = (key, views, flats)
        return self._slots[slot][1]

    def flat(self, slot: str) -> list[Tensor]:
        """The flat tensors behind the last :meth:`get` of ``slot``, one per bucket."""
        return self._slots[slot][2]
