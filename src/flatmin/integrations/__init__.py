"""Thin adapters between flatmin and the frameworks people train with, one module each.

* :mod:`flatmin.integrations.lightning` — a callback that drives SAF and MESA (epochs,
  teacher updates, checkpoints) and checks the Trainer's settings against a SAM-family
  optimizer; a precision plugin for ``16-mixed`` with a GradScaler.
* :mod:`flatmin.integrations.transformers` — a ``Trainer`` that trains with any
  SAM-family optimizer, and a callback for SAF and MESA.
* :mod:`flatmin.integrations.accelerate` — one SAM-family step on prepared objects.
* :mod:`flatmin.integrations.timm` — the SAM family in timm's optimizer registry.

Each module imports its framework at the top (that is its point), so import the one
you use; nothing else in flatmin imports them. Install the frameworks with
``pip install "flatmin[integrations]"`` (timm is not part of that extra: it needs a
torchvision built for your torch).
"""
