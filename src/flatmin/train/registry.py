"""The registered methods: one :func:`register` call per method, with the paper's defaults.

Importing this module fills :data:`METHODS`; :func:`get_method` looks a method up by name.
A new method is one more ``register(MethodSpec(...))`` here (see :mod:`.spec` for the
machinery and :mod:`.method` for update rules and loss terms).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flatmin.optim.esam import ESAM
from flatmin.optim.gsam import GSAM
from flatmin.optim.looksam import LookSAM
from flatmin.optim.sam import SAM
from flatmin.train.method import (
    MESATerm,
    Method,
    MethodContext,
    PerSampleTwoPassUpdate,
    SAFTerm,
    TwoPassUpdate,
)
from flatmin.train.spec import (
    METHODS,
    Hyperparameter,
    MethodSpec,
    all_hyperparameters,
    get_method,
    register,
)
from flatmin.trajectory.mesa import MESA
from flatmin.trajectory.saf import SAF

__all__ = [
    "ADAMW_HYPERPARAMETERS",
    "METHODS",
    "SGD_HYPERPARAMETERS",
    "all_hyperparameters",
    "get_method",
    "register",
]

# --- base optimizers -----------------------------------------------------------------

WEIGHT_DECAY_HELP = "weight decay (SGD: L2 in the gradient; AdamW: decoupled)"
SGD_HYPERPARAMETERS = (
    Hyperparameter("lr", 0.1, "peak learning rate", minimum=0.0),
    Hyperparameter("momentum", 0.9, "SGD momentum", minimum=0.0, maximum=1.0),
    Hyperparameter("weight_decay", 5e-4, WEIGHT_DECAY_HELP, minimum=0.0),
    Hyperparameter("nesterov", False, "Nesterov momentum"),
)
ADAMW_HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, "peak learning rate", minimum=0.0),
    Hyperparameter("beta1", 0.9, "Adam β1", minimum=0.0, maximum=1.0),
    Hyperparameter("beta2", 0.999, "Adam β2", minimum=0.0, maximum=1.0),
    Hyperparameter("weight_decay", 0.01, WEIGHT_DECAY_HELP, minimum=0.0),
)
RHO_HELP = "neighbourhood radius ρ of the perturbation"
ALPHA_HELP = "α: GSAM's weight of −g_⊥; LookSAM's weight of the reused direction g_v"
START_HELP = "0-based epoch after which the KL term is active (active when epoch > it)"


def _rho(default: float = 0.05, note: str = "") -> Hyperparameter:
    return Hyperparameter("rho", default, RHO_HELP + note, minimum=0.0)


def sgd_kwargs(hp: Mapping[str, Any]) -> dict[str, Any]:
    """The ``torch.optim.SGD`` keyword arguments of a resolved hyperparameter set."""
    return {
        "lr": hp["lr"],
        "momentum": hp["momentum"],
        "weight_decay": hp["weight_decay"],
        "nesterov": hp["nesterov"],
    }


def _sgd(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    return Method(torch.optim.SGD(model.parameters(), **sgd_kwargs(hp)))


def _adamw(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    betas = (hp["beta1"], hp["beta2"])
    return Method(
        torch.optim.AdamW(
            model.parameters(), lr=hp["lr"], betas=betas, weight_decay=hp["weight_decay"]
        )
    )


register(MethodSpec("sgd", "SGD with momentum, the baseline of every paper here",
                    SGD_HYPERPARAMETERS, _sgd))  # fmt: skip
register(MethodSpec("adamw", "AdamW (Loshchilov & Hutter, ICLR 2019)",
                    ADAMW_HYPERPARAMETERS, _adamw))  # fmt: skip

# --- the SAM family: two passes per step ---------------------------------------------


def _sam(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    return Method(
        SAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], **sgd_kwargs(hp)),
        TwoPassUpdate(),
    )


def _asam(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    # Named parameters let ASAM tell weights from biases by name (the official rule).
    optimizer = SAM(model.named_parameters(), torch.optim.SGD, rho=hp["rho"], adaptive="weights",
                    eta=hp["eta"], **sgd_kwargs(hp))  # fmt: skip
    return Method(optimizer, TwoPassUpdate())


def _usam(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], normalize=False,
                    **sgd_kwargs(hp))  # fmt: skip
    return Method(optimizer, TwoPassUpdate())


def _stablesam(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], stable=True,
                    stable_cap=hp["stable_cap"], **sgd_kwargs(hp))  # fmt: skip
    return Method(optimizer, TwoPassUpdate())


def _gsam(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    optimizer = GSAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], alpha=hp["alpha"],
                     rho_min=hp["rho_min"], **sgd_kwargs(hp))  # fmt: skip
    return Method(optimizer, TwoPassUpdate(weight_copies=2))  # w's copy, the clean gradient


def _looksam(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    optimizer = LookSAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], k=hp["k"],
                        alpha=hp["alpha"], **sgd_kwargs(hp))  # fmt: skip
    return Method(optimizer, TwoPassUpdate(weight_copies=3))  # ... and the kept g_v


def _esam(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    optimizer = ESAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], beta=hp["beta"],
                     gamma=hp["gamma"], seed=ctx.seed, **sgd_kwargs(hp))  # fmt: skip
    return Method(optimizer, PerSampleTwoPassUpdate())


register(MethodSpec(
    "sam", "Sharpness-Aware Minimization over SGD (Foret et al., ICLR 2021)",
    (*SGD_HYPERPARAMETERS, _rho()), _sam,
))  # fmt: skip
register(MethodSpec(
    "asam", "Adaptive SAM, official form T_w = |w| + η on weights (Kwon et al., ICML 2021)",
    (*SGD_HYPERPARAMETERS, _rho(0.5),
     Hyperparameter("eta", 0.01, "ASAM's η in T_w = |w| + η", minimum=0.0)),
    _asam,
))  # fmt: skip
register(MethodSpec(
    "usam", "unnormalized SAM, ε = ρ·g (Andriushchenko & Flammarion, ICML 2022)",
    (*SGD_HYPERPARAMETERS, _rho(note=" (no paper default: SAM's)")), _usam,
))  # fmt: skip
register(MethodSpec(
    "stablesam", "SAM with the surrogate gradient renormalized to ‖g‖ (Tan et al., 2024)",
    (*SGD_HYPERPARAMETERS, _rho(),
     Hyperparameter("stable_cap", False, "cap the renormalization factor at 1")),
    _stablesam,
))  # fmt: skip
register(MethodSpec(
    "gsam",
    "surrogate-gap guided SAM, d = g_s − α·g_⊥, ρ following the LR (Zhuang et al., ICLR 2022)",
    (*SGD_HYPERPARAMETERS, _rho(note=" (GSAM: ρ_max)"),
     Hyperparameter("alpha", 0.4, ALPHA_HELP, minimum=0.0),
     Hyperparameter("rho_min", 0.0, "GSAM's ρ_min, reached when the LR is 0", minimum=0.0)),
    _gsam,
))  # fmt: skip
register(MethodSpec(
    "looksam",
    "SAM's second pass every k-th step, its direction reused in between (Liu et al., CVPR 2022)",
    (*SGD_HYPERPARAMETERS, _rho(),
     Hyperparameter("k", 5, "LookSAM: a full SAM step every k steps", minimum=1),
     Hyperparameter("alpha", 0.7, ALPHA_HELP, minimum=0.0)),
    _looksam,
))  # fmt: skip
register(MethodSpec(
    "esam",
    "efficient SAM: random weight subsets and sharpness-selected samples (Du et al., ICLR 2022)",
    (*SGD_HYPERPARAMETERS, _rho(),
     Hyperparameter("beta", 0.6, "ESAM: probability a weight tensor is perturbed",
                    minimum=0.0, maximum=1.0),
     Hyperparameter("gamma", 0.5, "ESAM: fraction of the batch in the second pass",
                    minimum=0.0, maximum=1.0)),
    _esam,
))  # fmt: skip

# --- trajectory losses: one pass plus a loss term -------------------------------------


def _saf(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    top_k = hp["top_k"]
    if top_k > ctx.num_classes:
        raise ValueError(
            f"--top-k must be 0 (full rows) or at most the dataset's {ctx.num_classes} "
            f"classes, got {top_k}"
        )
    saf = SAF(ctx.num_samples, ctx.num_classes, lam=hp["lam"], tau=hp["tau"],
              lag_epochs=hp["lag_epochs"], start_epoch=hp["start_epoch"],
              top_k=top_k or None)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), **sgd_kwargs(hp))
    return Method(optimizer, terms={"saf": SAFTerm(saf)})


def _mesa(model: nn.Module, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
    mesa = MESA(model, decay=hp["ema_decay"], lam=hp["lam"], tau=hp["tau"],
                start_epoch=hp["start_epoch"], warmup=hp["ema_warmup"])  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), **sgd_kwargs(hp))
    return Method(optimizer, terms={"mesa": MESATerm(mesa)})


register(MethodSpec(
    "saf",
    "Sharpness-Aware training for Free: KL to the logits of Ẽ epochs ago (Du et al., "
    "NeurIPS 2022)",
    (*SGD_HYPERPARAMETERS,
     Hyperparameter("lam", 0.3, "weight λ of the trajectory KL term", minimum=0.0),
     Hyperparameter("tau", 5.0, "temperature τ of the KL term", minimum=1e-12),
     Hyperparameter("lag_epochs", 3, "SAF's lag Ẽ in epochs", minimum=1),
     Hyperparameter("start_epoch", 5, START_HELP, minimum=0),
     Hyperparameter("top_k", 0, "SAF: store only the K largest past logits per sample and "
                    "the others' mass, the KL's bucket (0: full rows)", minimum=0)),
    _saf,
))  # fmt: skip
register(MethodSpec(
    "mesa",
    "Memory-Efficient SAF: KL to an EMA teacher (Du et al., NeurIPS 2022)",
    (*SGD_HYPERPARAMETERS,
     Hyperparameter("lam", 0.8, "weight λ of the trajectory KL term", minimum=0.0),
     Hyperparameter("tau", 5.0, "temperature τ of the KL term", minimum=1e-12),
     Hyperparameter("ema_decay", 0.9998, "MESA's EMA decay β", minimum=0.0, maximum=1.0),
     Hyperparameter("ema_warmup", False, "EMA decay warm-up min(β, (1+t)/(10+t))"),
     Hyperparameter("start_epoch", 5, START_HELP, minimum=0)),
    _mesa,
))  # fmt: skip
