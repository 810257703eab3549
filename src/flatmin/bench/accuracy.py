"""``flatmin bench accuracy``: train and measure every run of a study, resumably.

Every (section, variant, seed) of a study (:mod:`flatmin.bench.studies`) is one ordinary
``flatmin train`` run — the :class:`~flatmin.train.loop.Trainer` with its
``metrics.jsonl``, ``config.json`` and checkpoint — in ``OUT/SECTION/VARIANT-sSEED/``,
followed by a final measurement of the trained weights (SAM sharpness at ρ = 0.05 and
the Hessian's λmax, :mod:`flatmin.measure`) in ``final.json``. The runner is resumable:
a run with ``final.json`` is skipped, a run with a partial checkpoint continues from
it, and the run directory's lock (:mod:`flatmin.train.lock`) lets several worker
processes share one study: start the command twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn import functional as F

from flatmin.bench.studies import Section, Variant
from flatmin.measure import hessian_eigenvalues, sam_sharpness
from flatmin.train import checkpoint as ckpt
from flatmin.train.config import TrainConfig
from flatmin.train.data import DatasetBundle
from flatmin.train.lock import RunLock
from flatmin.train.loop import Trainer, first_samples, weights_are_finite

FINAL_NAME = "final.json"
MEASURE_SAMPLES = 1024


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

    def config(self, threads: int | None, epochs: int | None = None) -> TrainConfig:
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


def run_job(
    job: RunJob, root: Path, threads: int | None, epochs: int | None = None
) -> dict[str, Any] | None:
    """Train (or continue) ``job`` and measure its final weights; ``None`` if another
    worker holds its run directory. Returns the contents of its ``final.json`` (read,
    not recomputed, when the run is finished)."""
    out = job.directory(root)
    final = out / FINAL_NAME
    lock = RunLock(out)
    if not lock.acquire():
        return None
    try:
        if final.is_file():  # finished, perhaps by the worker that held the lock until now
            return json.loads(final.read_text())
        trainer = Trainer(job.config(threads, epochs), out, progress=False, lock=False)
        records = trainer.run(resume=(out / ckpt.CHECKPOINT_NAME).is_file())
        started = time.perf_counter()
        if records[-1].get("diverged"):
            measured = diverged_measures(
                min(MEASURE_SAMPLES, len(trainer.config.load_data().train))
            )
        else:
            run = ckpt.load_run(out)
            measured = measure_final(run.model, run.data)
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


def diverged_measures(samples: int) -> dict[str, Any]:
    """The final measures of a run whose weights are not finite: none (every measure
    would be NaN), and the flag."""
    return {
        "sam_sharpness": None,
        "sharpness_loss": None,
        "lambda_max": None,
        "lambda_max_converged": False,
        "lambda_max_iterations": 0,
        "measure_samples": samples,
        "diverged": True,
    }


def measure_final(
    model: nn.Module, data: DatasetBundle, samples: int = MEASURE_SAMPLES
) -> dict[str, Any]:
    """SAM sharpness ``L(w+ρg/‖g‖) − L(w)`` at ρ = 0.05 and the Hessian's λmax (Lanczos)
    of ``model``, on the first ``samples`` training examples of ``data`` with the labels
    it was trained on (noisy ones included), in eval mode. Weights that are not finite
    give :func:`diverged_measures`."""
    batch = first_samples(data.train, samples)
    n = len(batch[1])
    if not weights_are_finite(model):
        return diverged_measures(n)
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
    log: Callable[[str], None] = print,
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
