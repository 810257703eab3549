"""The accuracy study's tables: mean ± std per variant and paired differences by seed.

Each variant's difference to its baseline is taken on the seeds both finished, with a
paired Student-t interval (:mod:`flatmin.bench.stats`); sharpness, λmax and the final
training loss are averaged over the runs that did not diverge.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flatmin.bench.accuracy import FINAL_NAME, RunJob
from flatmin.bench.stats import paired_difference, summarize
from flatmin.bench.studies import Section
from flatmin.bench.topk import top_k_summary


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
            "epochs": sorted({runs[s]["epochs"] for s in seeds if "epochs" in runs[s]}),
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
    return summarize(values).mean if values else None


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_section(section: Section, rows: Sequence[Mapping[str, Any]]) -> str:
    header = (
        "| variant | n | test acc % (mean ± std) | Δ vs baseline (pp) [95 % paired CI] "
        "| SAM sharpness ρ=0.05 | λmax | final train loss | train s/run |"
    )
    heading = section.title
    ran = sorted({e for r in rows for e in r.get("epochs", ())})
    if ran and ran != [section.epochs]:  # shortened runs: the title's epoch count is not theirs
        counts = ", ".join(str(e) for e in ran)
        heading += f" — these runs: {counts} epochs, not the study's {section.epochs}"
    lines = [f"### {heading}", "", header, "|" + "---|" * 8]
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
        if section.top_k_gradient:
            text, summary = top_k_summary(section, rows, root)
            data["sections"][section.name]["top_k"] = summary
            blocks.append(text)
    if missing:
        blocks.append("Not registered when this ran (left out): " + ", ".join(missing))
    return "\n\n".join(blocks) + "\n", data
