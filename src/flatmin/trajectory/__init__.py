"""Trajectory losses: sharpness-aware training without a second pass.

:class:`SAF` compares each sample's logits with its own logits of a few epochs ago (a
per-sample :class:`LogitStore`, or :class:`TopKLogitStore` that keeps only the top ``k``);
:class:`MESA` compares them with those of an :class:`EMA` teacher, run through a
BatchNorm-folded forward (:mod:`.fold`). Both add the tempered KL of :func:`tempered_kl`
(SAF with ``top_k``: :func:`bucketed_tempered_kl`) (Du et al., NeurIPS 2022).
"""

from flatmin.trajectory.ema import EMA
from flatmin.trajectory.kl import bucketed_tempered_kl, tempered_kl
from flatmin.trajectory.logit_store import LogitStore
from flatmin.trajectory.mesa import MESA
from flatmin.trajectory.saf import SAF
from flatmin.trajectory.topk_store import TopKLogitStore

__all__ = [
    "EMA", "MESA", "SAF", "LogitStore", "TopKLogitStore", "bucketed_tempered_kl", "tempered_kl",
]  # fmt: skip
