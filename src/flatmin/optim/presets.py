"""ASAM and StableSAM: :class:`~flatmin.optim.sam.SAM` with their papers' options and
defaults (the engine implements both; see :mod:`flatmin.optim.sam` for the math)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flatmin.optim._base import OptimizerFactory
from flatmin.optim.sam import SAM


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021), official form: ``T_w = |w| + η`` on weights.

    Defaults ρ = 0.5 and η = 0.01 follow the paper's CIFAR-10 setting (use ρ = 1.0 on
    CIFAR-100). ``adaptive="all"`` gives the popular port's form (η = 0, ρ ≈ 2):

    .. test: setup=model

    ::

        opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: OptimizerFactory,
        rho: float = 0.5,
        adaptive: str = "weights",
        stable: bool = False,
        **kwargs: Any,
    ) -> None:
        if adaptive is None:
            raise ValueError(
                "ASAM needs an adaptive form, 'weights' (official) or 'all'; use SAM for "
                "the non-adaptive one"
            )
        super().__init__(params, base_optimizer, rho, adaptive, stable, **kwargs)


class StableSAM(SAM):
    """StableSAM (Tan et al., 2024): SAM with its update renormalised to ‖g‖.

    Default ρ = 0.05 as for SAM; ``normalize=False`` gives the USAM-based form that the
    authors' code marks as the paper's, ``stable_cap=True`` the optional cap at 1. With an
    adaptive form both norms of ``γ = ‖T g‖/‖T g_s‖`` use the ``T`` of ``w``, where the
    authors' code takes ``‖T g_s‖`` at ``w + ε`` (the reason is in :mod:`flatmin.optim.sam`):

    .. test: setup=model

    ::

        opt = StableSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: OptimizerFactory,
        rho: float = 0.05,
        adaptive: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, adaptive, stable=True, **kwargs)
