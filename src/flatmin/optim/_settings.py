"""The settings every SAM-family param group carries, and their checks.

``rho`` is the radius ρ; ``adaptive`` the scaling ``T`` of ASAM (Kwon et al., ICML 2021):
``None`` (SAM, ``T = 1``), ``"weights"`` (the official form: ``T_w = |w| + η`` on
parameters whose name contains ``weight``) or ``"all"`` (the popular port's form:
``|w| + η`` on every parameter); ``eta`` its η, whose default depends on the form.
The options of the engine itself (``model``, ``max_grad_norm``, StableSAM's cap) are
checked once, by :func:`check_engine_options`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

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


def check_eta_has_a_form(groups: list[dict[str, Any]], eta: Any) -> None:
    """Raise if the constructor's η is given but no group has an adaptive form."""
    if eta is not None and not any(g["adaptive"] for g in groups):
        raise ValueError(
            f"eta={eta!r} is ASAM's η in T_w = |w| + η and has no effect without an "
            "adaptive form: pass adaptive='weights' or 'all', or leave eta out"
        )


def check_group_eta_has_a_form(group: dict[str, Any], default_adaptive: Any) -> None:
    """Raise if a param group gives its own η but has no adaptive form (its own, or
    ``default_adaptive``, the constructor's): η would have no effect."""
    eta = group.get("eta")
    if eta is not None and group.get("adaptive", default_adaptive) is None:
        raise ValueError(
            f"a param group has eta={eta!r}, ASAM's η in T_w = |w| + η, but no adaptive "
            "form, so it would have no effect: give the group adaptive='weights' or 'all' "
            "as well, or leave its eta out"
        )


def check_group_settings(group: dict[str, Any]) -> None:
    """The SAM settings of a param group (or of a constructor's defaults)."""
    check_rho(group["rho"])
    check_adaptive(group["adaptive"])
    check_eta(group["eta"])


def check_engine_options(
    params: list[Any], model: Any, max_grad_norm: Any, stable: bool, stable_cap: bool
) -> None:
    """The SAM engine's own constructor options: a non-empty parameter list, ``model`` an
    ``nn.Module`` or None, ``max_grad_norm`` None or > 0, ``stable_cap`` only with
    ``stable``."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            "model must be the nn.Module being trained (its BatchNorm statistics are kept "
            f"to the first pass), got {type(model).__name__}"
        )
    if max_grad_norm is not None:
        check_real("max_grad_norm", max_grad_norm, minimum=0.0, exclusive_minimum=True)
    if stable_cap and not stable:
        raise ValueError(
            "stable_cap=True caps StableSAM's factor, which only stable=True applies: "
            "pass stable=True as well, or leave stable_cap off"
        )
    if not params:
        raise ValueError(
            "SAM got an empty parameter list: pass model.parameters() (or a list of "
            "param groups) of a model that has parameters"
        )
