"""What flatmin needs to know about FSDP2 (``torch.distributed.fsdp.fully_shard``) models.

``fully_shard`` turns a module's parameters into ``DTensor`` shards (each rank holds rows
of every tensor) and all-gathers them around each forward and backward; its gradient
reduce-scatter *averages* over the ranks. Two consequences for the SAM family and the
trajectory methods:

* **Forward passes without a backward leave the gathered weights in place** when a
  module is sharded with ``reshard_after_forward=False`` (the default of the root
  module): its parameters are then the unsharded tensors, and changes to the shards
  (SAM's ε, its restore, MESA's EMA) stay invisible to the next forward until it is
  resharded. :func:`reshard` puts every FSDP module back on its shards (a no-op for
  modules already sharded); call it after evaluation and any other forward that is not
  followed by a backward.
* **Initial weights are not broadcast**: each rank keeps its own initialisation's rows.
  Seed every rank alike before building the model (or load a checkpoint).

Example, on every rank, for a ``model`` made of ``model.layers``:

.. test: setup=fsdp processes=2

::

    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert is_sharded(model)
    with torch.no_grad():
        logits = model(x)               # an evaluation: a forward without backward
    reshard(model)                      # the next SAM step perturbs the shards
"""

from __future__ import annotations

import sys

from torch import nn


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) that ``fully_shard`` sharded."""
    # No module can be sharded before torch.distributed.fsdp is loaded, and importing it
    # would slow down `import flatmin.distributed` by half a second.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return []
    return [module for module in model.modules() if isinstance(module, fsdp.FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` or one of its submodules is sharded by ``fully_shard``."""
    return bool(fsdp_modules(model))


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP module of ``model``, so that its
    registered parameters are the shards again (see the module docstring)."""
    for module in fsdp_modules(model):
        module.reshard()
