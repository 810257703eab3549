"""The accuracy studies' presets: sections of variants and seeds, paired by seed.

A *study* is a list of :class:`Section` s (one dataset setting each); a section lists
*variants* (a method with hyperparameters) and seeds. Runs of different methods with the
same seed share the initial weights, the data order and the noisy labels, so each
variant is compared with its baseline seed by seed (:mod:`flatmin.bench.report`).

Presets (:func:`study`):

- ``quick``: MNIST-1D with 40 % symmetric label noise, every method at its paper
  defaults over 5 seeds, 60 epochs; SAF's λ and Ẽ and MESA's EMA decay swept; SGD / SAM /
  StableSAM over a learning-rate sweep; a small search of budget and ρ on Fashion-MNIST
  with 40 % noise (SGD vs SAM), then every method on Fashion-MNIST clean and with 40 %
  noise (a 10k-sample subset; MLP); SAF's compressed store (``top_k`` ∈ {1, 2, 3, 5, 10})
  against full rows on both noisy settings, with the error of the term's gradient
  measured on the full store's last logits.
- ``full``: the MNIST-1D sections with 100 epochs and the learning-rate sweep over 5
  seeds; every method on the whole Fashion-MNIST training set (MLP), clean for 30
  epochs and with 40 % noise for 60.

What each preset costs and finds is in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flatmin.train.registry import METHODS

# Every method the study compares, in table order; those not registered are skipped
# (and the report says so).
STUDY_METHODS = ("sgd", "sam", "asam", "stablesam", "gsam", "looksam", "esam", "saf", "mesa")


@dataclass(frozen=True)
class Variant:
    """A method with hyperparameters; ``label`` names it in tables and directories."""

    label: str
    method: str
    hyperparameters: tuple[tuple[str, Any], ...] = ()
    baseline: str = "sgd"  # label of the variant its paired difference is taken against
    home: str | None = None  # another section that holds the identical run (reused)
    home_label: str | None = None  # its label there, if different

    @classmethod
    def of(cls, method: str, label: str | None = None, baseline: str = "sgd", **hp: Any) -> Variant:
        return cls(label or method, method, tuple(sorted(hp.items())), baseline)

    def reused_from(self, section: str, label: str | None = None) -> Variant:
        """This variant, with its runs read from (and trained in) ``section``, where it is
        called ``label`` (default: its own label); the configurations must be identical."""
        return dataclasses.replace(self, home=section, home_label=label)


@dataclass(frozen=True)
class Section:
    """One dataset setting of the study, with its variants and seeds."""

    name: str
    title: str
    dataset: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    epochs: int
    model: str | None = None
    label_noise: float = 0.0
    subset: int | None = None
    batch_size: int = 128
    track_sharpness: bool = True
    settings: Mapping[str, Any] = field(default_factory=dict)  # other TrainConfig fields
    # SAF top-k sections: the k whose gradient error is measured on the full store's runs
    # (the variant labelled "saf"), see flatmin.bench.topk.gradient_errors
    top_k_gradient: tuple[int, ...] = ()


def _core_variants(rho: float | None = None, **trajectory: Any) -> tuple[Variant, ...]:
    """Every study method at its paper defaults; ``rho`` (if given) replaces ρ of the
    SAM-family methods that take an L2 radius ``rho`` (not ASAM, whose ρ lives on another
    scale); ``trajectory`` overrides SAF's and MESA's start/lag (scaled for short runs)."""
    saf = {k: v for k, v in trajectory.items() if k in ("start_epoch", "lag_epochs")}
    mesa = {k: v for k, v in trajectory.items() if k == "start_epoch"}
    out = []
    for method in STUDY_METHODS:
        hp = saf if method == "saf" else mesa if method == "mesa" else {}
        declared = {h.name for h in METHODS[method].hyperparameters} if method in METHODS else ()
        if rho is not None and method != "asam" and "rho" in declared:
            hp = {**hp, "rho": rho}
        out.append(Variant.of(method, **hp))
    return tuple(out)


def _sensitivity_variants() -> tuple[Variant, ...]:
    """SAF's λ (default 0.3) and Ẽ (default 3), MESA's EMA decay (default 0.9998); the
    default runs are those of the main MNIST-1D section."""
    main = "mnist1d-noise40"
    return (
        Variant.of("sgd").reused_from(main),
        Variant.of("saf").reused_from(main),
        Variant.of("saf", "saf-lam0.1", lam=0.1),
        Variant.of("saf", "saf-lam1.0", lam=1.0),
        Variant.of("saf", "saf-lag1", lag_epochs=1),
        Variant.of("saf", "saf-lag5", lag_epochs=5),
        Variant.of("mesa").reused_from(main),
        Variant.of("mesa", "mesa-decay0.99", ema_decay=0.99),
        Variant.of("mesa", "mesa-decay0.998", ema_decay=0.998),
    )


def _lr_sweep_variants(lrs: Sequence[float], main: str | None = None) -> tuple[Variant, ...]:
    """SGD, SAM and StableSAM at each learning rate; lr = 0.1 (the default) reuses the
    runs of the section ``main`` if given."""
    out = []
    for lr in lrs:
        base = f"sgd-lr{lr:g}"
        for method in ("sgd", "sam", "stablesam"):
            variant = Variant.of(method, f"{method}-lr{lr:g}", baseline=base, lr=lr)
            if main is not None and lr == 0.1:
                variant = variant.reused_from(main, method)
            out.append(variant)
    return tuple(out)


def _top_k_variants(home: str, ks: Sequence[int], **saf: Any) -> tuple[Variant, ...]:
    """SGD and SAF with full rows (the runs of the section ``home``), and SAF with
    ``top_k = k`` for each ``k``, paired with SAF's full rows."""
    return (
        Variant.of("sgd").reused_from(home),
        Variant.of("saf", **saf).reused_from(home),
        *(Variant.of("saf", f"saf-top{k}", baseline="saf", top_k=k, **saf) for k in ks),
    )


def _fmnist_search_variants(rhos: Sequence[float]) -> tuple[Variant, ...]:
    return (Variant.of("sgd"), *(Variant.of("sam", f"sam-rho{r:g}", rho=r) for r in rhos))


def study(name: str) -> tuple[Section, ...]:
    """The sections of the preset ``name`` (``quick`` or ``full``)."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; valid studies: {', '.join(STUDIES)}")
    return STUDIES[name]()


def _mnist1d_sections(epochs: int, sweep_seeds: tuple[int, ...]) -> tuple[Section, ...]:
    """The three MNIST-1D (40 % label noise) sections both presets run: the core
    methods, the SAF/MESA sensitivity and the learning-rate sweep (on ``sweep_seeds``)."""
    five = (0, 1, 2, 3, 4)
    m1d = {"dataset": "mnist1d", "model": "cnn1d", "label_noise": 0.4, "epochs": epochs}
    return (
        Section(
            "mnist1d-noise40",
            f"MNIST-1D, 40 % label noise, {epochs} epochs",
            variants=_core_variants(),
            seeds=five,
            **m1d,
        ),
        Section(
            "mnist1d-sensitivity",
            "MNIST-1D 40 % noise: SAF λ, Ẽ and MESA decay",
            variants=_sensitivity_variants(),
            seeds=five,
            **m1d,
        ),
        Section(
            "mnist1d-lr-sweep",
            "MNIST-1D 40 % noise: SGD / SAM / StableSAM over the learning rate",
            variants=_lr_sweep_variants((0.01, 0.03, 0.1, 0.3, 0.5, 1.0), "mnist1d-noise40"),
            seeds=sweep_seeds,
            **m1d,
        ),
    )


def _quick() -> tuple[Section, ...]:
    five, three = (0, 1, 2, 3, 4), (0, 1, 2)
    # Fashion-MNIST: an MLP on a 10k-sample subset fits the preset's budget; SAF/MESA
    # start after 3 of 30 epochs with a lag of 2, the papers' early fraction of a run
    # (5 and 3 of 200). The noisy section uses ρ = 0.1, the SAM paper's value for 20–60 %
    # label noise; the search sections that chose the budget are in RESULTS.md.
    fm = {"dataset": "fashion-mnist", "model": "mlp", "subset": 10_000, "epochs": 30}
    short = {"start_epoch": 3, "lag_epochs": 2}
    ks = (1, 2, 3, 5, 10)  # 10 = C: the bucket is empty, the term the full one
    return (
        *_mnist1d_sections(epochs=60, sweep_seeds=three),
        Section(
            "mnist1d-noise40-topk",
            "MNIST-1D 40 % noise: SAF's top-k store against full rows (60 epochs)",
            variants=_top_k_variants("mnist1d-noise40", ks),
            seeds=five,
            dataset="mnist1d",
            model="cnn1d",
            label_noise=0.4,
            epochs=60,
            top_k_gradient=ks,
        ),
        Section(
            "fmnist-search",
            "Fashion-MNIST 40 % noise: budget × ρ search (SGD vs SAM)",
            variants=_fmnist_search_variants((0.05, 0.1, 0.2)),
            seeds=(0, 1),
            **{**fm, "epochs": 10, "label_noise": 0.4},
        ),
        Section(
            "fmnist-search-long",
            "Fashion-MNIST 40 % noise: budget × ρ search, longer",
            variants=_fmnist_search_variants((0.05, 0.1, 0.2)),
            seeds=(0, 1),
            **{**fm, "label_noise": 0.4},
        ),
        Section(
            "fmnist-clean",
            "Fashion-MNIST clean (10k subset, MLP, 30 epochs)",
            variants=_core_variants(**short),
            seeds=five,
            **fm,
        ),
        Section(
            "fmnist-noise40",
            "Fashion-MNIST 40 % noise (10k subset, MLP, 30 epochs; SAM-family ρ = 0.1)",
            variants=_core_variants(rho=0.1, **short),
            seeds=five,
            label_noise=0.4,
            **fm,
        ),
        Section(
            "fmnist-noise40-topk",
            "Fashion-MNIST 40 % noise: SAF's top-k store against full rows (10k subset, MLP, "
            "30 epochs)",
            variants=_top_k_variants("fmnist-noise40", ks, **short),
            seeds=five,
            label_noise=0.4,
            top_k_gradient=ks,
            **fm,
        ),
    )


def _full() -> tuple[Section, ...]:
    five = (0, 1, 2, 3, 4)
    # Fashion-MNIST: the MLP on the whole training set, 60 epochs with noise (it starts
    # to fit the flipped labels only then) and 30 clean; why not the BatchNorm CNN is in
    # RESULTS.md (the pilots). SAF/MESA at the papers' start and lag (5 and 3 epochs).
    fm = {"dataset": "fashion-mnist", "model": "mlp"}
    return (
        *_mnist1d_sections(epochs=100, sweep_seeds=five),
        Section(
            "fmnist-clean",
            "Fashion-MNIST clean (whole training set, MLP, 30 epochs)",
            variants=_core_variants(),
            seeds=five,
            epochs=30,
            **fm,
        ),
        Section(
            "fmnist-noise40",
            "Fashion-MNIST 40 % noise (whole training set, MLP, 60 epochs; SAM-family ρ = 0.1)",
            variants=_core_variants(rho=0.1),
            seeds=five,
            epochs=60,
            label_noise=0.4,
            **fm,
        ),
    )


STUDIES = {"quick": _quick, "full": _full}
