"""flatmin: sharpness-aware training for PyTorch.

Two-pass optimizers of the SAM family (:mod:`flatmin.optim`), the "free" trajectory
losses SAF and MESA (:mod:`flatmin.trajectory`), sharpness diagnostics
(:mod:`flatmin.measure`) and multi-process training (:mod:`flatmin.distributed`).
Public names and subpackages are imported on first use, so ``import flatmin`` stays
cheap and a user who only needs one part pays only for that part:

.. test: setup=model

::

    import flatmin

    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    flatmin.measure.sam_sharpness(model, loss_fn, (x, y))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SAM": "flatmin.optim.sam",
    "ASAM": "flatmin.optim.presets",
    "StableSAM": "flatmin.optim.presets",
    "GSAM": "flatmin.optim.gsam",
    "LookSAM": "flatmin.optim.looksam",
    "ESAM": "flatmin.optim.esam",
    "SAF": "flatmin.trajectory.saf",
    "MESA": "flatmin.trajectory.mesa",
}
_SUBPACKAGES = ("data", "distributed", "measure", "optim", "trajectory")

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"flatmin.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flatmin' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBPACKAGES])
