"""Trajectory losses: sharpness-aware training without a second pass.

:class:`SAF` compares each sample's logits with its own logits of a few epochs ago (a
per-sample :class:`LogitStore`); :class:`MESA` compares them with those of an
:class:`EMA` teacher, run through a BatchNorm-folded forward (:mod:`.fold`). Both add the
tempered KL of :func:`tempered_kl` (Du et al., NeurIPS 2022).
"""

from flatmin.trajectory.ema import EMA
from flatmin.trajectory.kl import tempered_kl
from flatmin.trajectory.logit_store import LogitStore
from flatmin.trajectory.mesa import MESA
from flatmin.trajectory.saf import SAF

__all__ = ["EMA", "MESA", "SAF", "LogitStore", "tempered_kl"]
