"""``flatmin bench accuracy``: multi-seed accuracy and sharpness of every method, paired by seed.

A *study* is a list of :class:`Section` s (one dataset setting each); a section lists
*variants* (a method with hyperparameters) and seeds. Every (section, variant, seed) is
one ordinary ``flatmin train`` run — the :class:`~flatmin.train.loop.Trainer` with its
``metrics.jsonl``, ``config.json`` and checkpoint — in
``OUT/SECTION/VARIANT-sSEED/``, followed by a final measurement of the trained weights
(SAM sharpness at ρ = 0.05 and the Hessian's λmax, :mod:`flatmin.measure`) in
``final.json``. The runner is resumable: a run with ``final.json`` is skipped, a run
with a partial checkpoint continues from it, and a lock file per run lets several
worker processes share one study (``--workers``-style: start the command twice).

Runs of different methods with the same seed share the initial weights, the data order
and the noisy labels, so each method's difference to SGD is reported per seed, with a
paired Student-t interval (:mod:`flatmin.bench.stats`).

Presets (``--study``):

- ``quick`` (≈ 2 h on 2 cores): MNIST-1D with 40 % symmetric label noise, every method
  at its paper defaults over 5 seeds, 60 epochs; SAF's λ and Ẽ and MESA's EMA decay
  swept; SGD / SAM / StableSAM over a learning-rate sweep; a small search of budget and ρ
  on Fashion-MNIST with 40 % noise (SGD vs SAM), then every method on Fashion-MNIST clean
  and with 40 % noise (a 10k-sample subset; MLP).
- ``full`` (≈ 3 CPU-hours): the MNIST-1D sections with 100 epochs and the
  learning-rate sweep over 5 seeds; every method on the whole Fashion-MNIST training set
  (MLP), clean for 30 epochs and with 40 % noise for 60.

``--report`` only aggregates what exists into ``accuracy_<study>.txt``/``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DESCRIPTION = "multi-seed accuracy and sharpness of every method, paired by seed"

# Every method the study compares, in table order; those not registered are skipped
# (and the report says so).
STUDY_METHODS = ("sgd", "sam", "asam", "stablesam", "gsam", "looksam", "esam", "saf", "mesa")
FINAL_NAME = "final.json"
LOCK_NAME = ".bench.lock"
MEASURE_SAMPLES = 1024


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


def _core_variants(rho: float | None = None, **trajectory: Any) -> tuple[Variant, ...]:
    """Every study method at its paper defaults; ``rho`` (if given) replaces ρ of the
    SAM-family methods that take an L2 radius ``rho`` (not ASAM, whose ρ lives on another
    scale); ``trajectory`` overrides SAF's and MESA's start/lag (scaled for short runs)."""
    from flatmin.train.registry import METHODS

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
    # Fashion-MNIST: an MLP on a 10k-sample subset (test: a 10k subset too) fits the
    # 2-hour budget; SAF/MESA start after 3 of 30 epochs, SAF's lag is 2 (paper: 5 and 3
    # out of 200), i.e. the same early fraction of the run. The search sections (SGD vs
    # SAM, 10 and 30 epochs, ρ ∈ {0.05, 0.1, 0.2}) found SGD fitting the noisy labels by
    # epoch 30 (74 % test) while SAM held 79–83 %; 10 epochs did not separate them. The
    # noisy section uses ρ = 0.1, the SAM paper's value for 20–60 % label noise.
    fm = {"dataset": "fashion-mnist", "model": "mlp", "subset": 10_000, "epochs": 30}
    short = {"start_epoch": 3, "lag_epochs": 2}
    return (
        *_mnist1d_sections(epochs=60, sweep_seeds=three),
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
    )


def _full() -> tuple[Section, ...]:
    five = (0, 1, 2, 3, 4)
    # Fashion-MNIST: the MLP on the whole 60k training set, 6x the quick preset's data.
    # The BatchNorm CNN was measured first and dropped: at 1,851 images per CPU-second
    # (one thread) 60 epochs of the whole set cost ~40 CPU-hours for the two sections,
    # and on a 10k subset with 40 % noise it did not fit the flipped labels within 20
    # epochs (train accuracy 54 %, SGD = SAM), so nothing would separate at a budget
    # this machine allows. On the whole set the MLP needs 60 epochs to start fitting
    # the flipped labels (at 30, SGD's training accuracy is 58 % < the 60 % of correct
    # labels, and SAM is only +0.8 pp); the clean section converges in 30.
    # SAF/MESA at the papers' start and lag (5 and 3 epochs).
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


# --- running ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    """One training run of the study."""

    section: Section
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.label}-s{self.seed}"

    def directory(self, root: Path) -> Path:
        v = self.variant
        return root / (v.home or self.section.name) / f"{v.home_label or v.label}-s{self.seed}"

    def config(self, threads: int | None, epochs: int | None = None) -> Any:
        from flatmin.train.loop import TrainConfig

        s = self.section
        return TrainConfig(
            method=self.variant.method,
            dataset=s.dataset,
            model=s.model,
            epochs=epochs if epochs is not None else s.epochs,
            batch_size=s.batch_size,
            seed=self.seed,
            label_noise=s.label_noise,
            subset=s.subset,
            track_sharpness=s.track_sharpness,
            threads=threads,
            hyperparameters=dict(self.variant.hyperparameters),
            **dict(s.settings),
        )


def plan(
    sections: Iterable[Section],
    registered: Iterable[str],
    seeds: int | None = None,
) -> tuple[list[RunJob], list[str]]:
    """The runs of ``sections`` whose method is registered (first ``seeds`` seeds if
    given), and the sorted names of study methods that are not registered."""
    known = set(registered)
    jobs, missing = [], set()
    for section in sections:
        for seed in section.seeds[:seeds] if seeds is not None else section.seeds:
            for variant in section.variants:
                if variant.method in known:
                    jobs.append(RunJob(section, variant, seed))
                else:
                    missing.add(variant.method)
    return jobs, sorted(missing)


class RunLock:
    """An exclusive lock file holding the owner's pid; a lock whose process is gone is
    taken over (a killed worker does not block the study)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _pid_alive(self.path):
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _pid_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().strip() or "0")
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True
    return pid > 0


def run_job(
    job: RunJob, root: Path, threads: int | None, epochs: int | None = None
) -> dict[str, Any] | None:
    """Train (or continue) ``job`` and measure its final weights; None if another worker
    holds it. Returns the contents of its ``final.json``."""
    from flatmin.train import checkpoint as ckpt
    from flatmin.train.loop import Trainer

    out = job.directory(root)
    final = out / FINAL_NAME
    if final.is_file():
        return json.loads(final.read_text())
    lock = RunLock(out / LOCK_NAME)
    if not lock.acquire():
        return None
    try:
        if final.is_file():  # finished by the worker that held the lock until now
            return json.loads(final.read_text())
        trainer = Trainer(job.config(threads, epochs), out, progress=False)
        records = trainer.run(resume=(out / ckpt.CHECKPOINT_NAME).is_file())
        started = time.perf_counter()
        measured = measure_final(trainer)
        result = {
            "section": job.section.name,
            "variant": job.variant.label,
            "method": job.variant.method,
            "seed": job.seed,
            "epochs": len(records),
            "test_acc": records[-1]["test_acc"],
            "train_loss": records[-1]["train_loss"],
            "train_wall_time": records[-1]["wall_time"],
            **measured,
            "measure_wall_time": time.perf_counter() - started,
        }
        ckpt.write_json(final, result)
        return result
    finally:
        lock.release()


def measure_final(trainer: Any, samples: int = MEASURE_SAMPLES) -> dict[str, Any]:
    """SAM sharpness ``L(w+ρg/‖g‖) − L(w)`` at ρ = 0.05 and the Hessian's λmax (Lanczos)
    of the trained model, on the first ``samples`` training examples with the labels it
    was trained on (noisy ones included), in eval mode. A run whose weights are not
    finite is recorded as ``diverged`` with no measures."""
    import torch
    from torch.nn import functional as F

    from flatmin.measure import hessian_eigenvalues, sam_sharpness
    from flatmin.train.loop import weights_are_finite

    bundle = trainer.config.load_data(augment=False)
    n = min(samples, len(bundle.train))
    items = bundle.train.__getitems__(list(range(n)))
    batch = (torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))
    model = trainer.model
    if not weights_are_finite(model):
        # The run diverged: its weights hold NaN or inf, and so would every measure.
        return {
            "sam_sharpness": None,
            "sharpness_loss": None,
            "lambda_max": None,
            "lambda_max_converged": False,
            "lambda_max_iterations": 0,
            "measure_samples": n,
            "diverged": True,
        }
    sharp = sam_sharpness(model, F.cross_entropy, batch, rho=0.05)
    eig = hessian_eigenvalues(model, F.cross_entropy, batch, k=1, max_iter=40, tol=1e-3)
    return {
        "sam_sharpness": sharp.value,
        "sharpness_loss": sharp.loss,
        "lambda_max": eig.values[0],
        "lambda_max_converged": eig.converged,
        "lambda_max_iterations": eig.iterations,
        "measure_samples": n,
        "diverged": False,
    }


def run_study(
    jobs: Sequence[RunJob],
    root: Path,
    threads: int | None,
    epochs: int | None = None,
    log: Any = print,
) -> int:
    """Run every job not yet done; returns how many were left to other workers."""
    skipped = 0
    for i, job in enumerate(jobs, 1):
        started = time.perf_counter()
        result = run_job(job, root, threads, epochs)
        if result is None:
            skipped += 1
            log(f"[{i}/{len(jobs)}] {job.section.name}/{job.name}: held by another worker")
            continue
        measured = (
            "diverged (weights not finite)"
            if result.get("diverged")
            else f"sharpness {result['sam_sharpness']:.4f}  λmax {result['lambda_max']:.2f}"
        )
        log(
            f"[{i}/{len(jobs)}] {job.section.name}/{job.name}: test acc {result['test_acc']:.4f}"
            f"  {measured}  ({time.perf_counter() - started:.0f} s)"
        )
    return skipped


# --- reporting --------------------------------------------------------------------------


def collect(root: Path, sections: Sequence[Section]) -> dict[str, dict[str, dict[int, dict]]]:
    """``results[section][variant][seed]`` = the run's ``final.json``, for finished runs."""
    results: dict[str, dict[str, dict[int, dict]]] = {}
    for section in sections:
        for variant in section.variants:
            for seed in section.seeds:
                path = RunJob(section, variant, seed).directory(root) / FINAL_NAME
                if path.is_file():
                    entry = results.setdefault(section.name, {}).setdefault(variant.label, {})
                    entry[seed] = json.loads(path.read_text())
    return results


def section_rows(section: Section, results: Mapping[str, Mapping[int, dict]]) -> list[dict]:
    """One row per variant: accuracy mean ± std, the paired difference to its baseline
    (on the seeds both finished), and mean final sharpness and λmax."""
    from flatmin.bench.stats import paired_difference, summarize

    rows = []
    for variant in section.variants:
        runs = results.get(variant.label, {})
        if not runs:
            continue
        seeds = sorted(runs)
        acc = summarize([runs[s]["test_acc"] for s in seeds])
        measured = [s for s in seeds if not runs[s].get("diverged")]
        row: dict[str, Any] = {
            "variant": variant.label,
            "method": variant.method,
            "n": acc.n,
            "seeds": seeds,
            "test_acc": [runs[s]["test_acc"] for s in seeds],
            "acc_mean": acc.mean,
            "acc_std": acc.std,
            "diverged": len(seeds) - len(measured),
            "sharpness_mean": _mean_or_none([runs[s]["sam_sharpness"] for s in measured]),
            "lambda_max_mean": _mean_or_none([runs[s]["lambda_max"] for s in measured]),
            "train_loss_mean": _mean_or_none([runs[s]["train_loss"] for s in measured]),
            "wall_time_mean": summarize([runs[s]["train_wall_time"] for s in seeds]).mean,
        }
        base = results.get(variant.baseline, {})
        shared = [s for s in seeds if s in base]
        if variant.label != variant.baseline and len(shared) >= 2:
            d = paired_difference(
                [runs[s]["test_acc"] for s in shared], [base[s]["test_acc"] for s in shared]
            )
            row["diff"] = dataclasses.asdict(d)
        rows.append(row)
    return rows


def _mean_or_none(values: Sequence[float]) -> float | None:
    from flatmin.bench.stats import summarize

    return summarize(values).mean if values else None


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_section(section: Section, rows: Sequence[Mapping[str, Any]]) -> str:
    header = (
        "| variant | n | test acc % (mean ± std) | Δ vs baseline (pp) [95 % paired CI] "
        "| SAM sharpness ρ=0.05 | λmax | final train loss | train s/run |"
    )
    lines = [f"### {section.title}", "", header, "|" + "---|" * 8]
    for r in rows:
        diff = r.get("diff")
        if diff:
            mark = " *" if diff["low"] > 0 or diff["high"] < 0 else ""
            d = (
                f"{100 * diff['mean']:+.2f} [{100 * diff['low']:+.2f}, "
                f"{100 * diff['high']:+.2f}]{mark}"
            )
        else:
            d = "—"
        n = f"{r['n']} ({r['diverged']} diverged)" if r.get("diverged") else f"{r['n']}"
        lines.append(
            f"| {r['variant']} | {n} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}"
            f" | {d} | {_cell(r['sharpness_mean'], '.4f')} | {_cell(r['lambda_max_mean'], '.2f')}"
            f" | {_cell(r['train_loss_mean'], '.3f')} | {r['wall_time_mean']:.0f} |"
        )
    baselines = sorted({v.baseline for v in section.variants})
    lines.append("")
    lines.append(
        f"Δ is against {', '.join(baselines)} with the same seed (and learning rate); "
        "* marks an interval that excludes 0."
        + (
            " Sharpness, λmax and train loss are means over the runs that did not diverge."
            if any(r.get("diverged") for r in rows)
            else ""
        )
    )
    return "\n".join(lines)


def report(
    root: Path, sections: Sequence[Section], missing: Sequence[str]
) -> tuple[str, dict[str, Any]]:
    """The text tables and the JSON form of every section with finished runs."""
    results = collect(root, sections)
    blocks, data = [], {"missing_methods": list(missing), "sections": {}}
    for section in sections:
        rows = section_rows(section, results.get(section.name, {}))
        if not rows:
            continue
        data["sections"][section.name] = {"title": section.title, "rows": rows}
        blocks.append(format_section(section, rows))
    if missing:
        blocks.append("Not registered when this ran (left out): " + ", ".join(missing))
    return "\n\n".join(blocks) + "\n", data


# --- command line -----------------------------------------------------------------------


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--study", choices=sorted(STUDIES), default="quick", help="accuracy study preset"
    )
    group.add_argument(
        "--sections", nargs="+", metavar="NAME", help="run only these sections of the study"
    )
    group.add_argument(
        "--report", action="store_true", help="only aggregate finished runs into tables"
    )
    group.add_argument(
        "--results",
        metavar="DIR",
        default="benchmarks/results",
        help="where the tables go (default: benchmarks/results)",
    )


def run(args: argparse.Namespace) -> int:
    from flatmin.train.registry import METHODS

    sections = study(args.study)
    if args.sections:
        unknown = sorted(set(args.sections) - {s.name for s in sections})
        if unknown:
            print(
                f"flatmin bench accuracy: error: unknown sections {unknown}; the "
                f"{args.study} study has: {', '.join(s.name for s in sections)}",
                file=sys.stderr,
            )
            return 2
        sections = tuple(s for s in sections if s.name in args.sections)
    root = Path(args.out or f"runs/bench-accuracy-{args.study}")
    jobs, missing = plan(sections, METHODS, args.seeds)
    command = " ".join(getattr(args, "argv", None) or ["flatmin", *sys.argv[1:]])
    if not args.report:
        print(f"{len(jobs)} runs in {root}; not registered (left out): {missing or 'none'}")
        started = time.perf_counter()
        skipped = run_study(
            jobs, root, args.threads, args.epochs, log=lambda line: print(line, flush=True)
        )
        print(f"done in {time.perf_counter() - started:.0f} s; {skipped} left to other workers")
    text, data = report(root, study(args.study), missing)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"accuracy_{args.study}"
    head = f"# {command}\n# runs: {root}\n\n"
    stem.with_suffix(".txt").write_text(head + text)
    stem.with_suffix(".json").write_text(json.dumps({"command": command, **data}, indent=1))
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flatmin.bench.accuracy``: the same as ``flatmin bench`` with this mode."""
    parser = argparse.ArgumentParser(prog="python -m flatmin.bench.accuracy")
    parser.add_argument("--out", metavar="DIR")
    parser.add_argument("--seeds", type=int, metavar="N")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--threads", type=int, default=2)
    add_arguments(parser.add_argument_group("accuracy options"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = ["python -m flatmin.bench.accuracy", *argv]
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
