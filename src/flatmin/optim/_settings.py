"""The settings every SAM-family param group carries, and their checks.

``rho`` is the radius ρ; ``adaptive`` the scaling ``T`` of ASAM (Kwon et al., ICML 2021):
``None`` (SAM, ``T = 1``), ``"weights"`` (the official form: ``T_w = |w| + η`` on
parameters whose name contains ``weight``) or ``"all"`` (the popular port's form:
``|w| + η`` on every parameter); ``eta`` its η, whose default depends on the form.
"""

from __future__ import annotations

from typing import Any

from flatmin.optim._checks import check_choice, check_real

ADAPTIVE_FORMS = (None, "weights", "all")
DEFAULT_ETA = {"weights": 0.01, "all": 0.0}


def check_adaptive(adaptive: Any) -> None:
    """Raise unless ``adaptive`` is one of :data:`ADAPTIVE_FORMS` (bools are refused)."""
    if isinstance(adaptive, bool):
        raise ValueError(
            f"adaptive={adaptive!r} is not a form: use adaptive='weights' (official ASAM, "
            "|w| + η on weight tensors), adaptive='all' (every parameter) or None (SAM)"
        )
    check_choice("adaptive", adaptive, ADAPTIVE_FORMS)


def check_rho(rho: Any, name: str = "rho") -> float:
    """``rho`` as a float if it is a finite number ≥ 0."""
    return check_real(name, rho, minimum=0.0, hint="e.g. 0.05")


def check_eta(eta: Any) -> None:
    """Raise unless ``eta`` is None (the form's default) or a finite number ≥ 0."""
    if eta is not None:
        check_real("eta", eta, minimum=0.0, hint="ASAM's η in T_w = |w| + η")


def check_group_settings(group: dict[str, Any]) -> None:
    """The SAM settings of a param group (or of a constructor's defaults)."""
    check_rho(group["rho"])
    check_adaptive(group["adaptive"])
    check_eta(group["eta"])
