"""``flatmin plot RUN_DIR…``: overlay the per-epoch curves of training runs.

Each run directory holds ``metrics.jsonl`` (one JSON object per epoch with ``epoch``,
``train_loss``, ``test_acc`` and, when the run tracked it, ``sharpness``) and
``config.json`` (whose ``method`` labels the run). The figure has training loss, test
accuracy and — when any run has it — the SAM sharpness per epoch, as in the SAF
paper's Figure 3. An ``--out`` that cannot be written, like a run directory that cannot
be read, ends the command with one line and exit status 2 before anything is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from flatmin.cli._out import check_out
from flatmin.measure.plots import RunCurves, plot_runs

# The run files' names (flatmin.train.checkpoint), not imported: plotting needs no trainer.
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"


def _number(record: dict, key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def read_run_curves(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """The curves of one run directory, labelled by its config's ``method``."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_NAME
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_NAME}: is it a flatmin run directory?")
    records = []
    with open(metrics_path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{metrics_path}:{number}: not JSON ({error})") from None
    if not records:
        raise ValueError(f"{metrics_path} holds no epochs")
    if label is None:
        config_path = run_dir / CONFIG_NAME
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        label = str(config.get("method", run_dir.name))
    return RunCurves(
        label=label,
        epochs=[_number(r, "epoch") for r in records],
        train_loss=[_number(r, "train_loss") for r in records],
        test_acc=[_number(r, "test_acc") for r in records],
        sharpness=[_number(r, "sharpness") for r in records],
    )


def read_runs(run_dirs: list[Path]) -> list[RunCurves]:
    """Load every run; runs sharing a method are told apart by their directory names."""
    runs = [read_run_curves(d) for d in run_dirs]
    repeated = Counter(run.label for run in runs)
    for run, run_dir in zip(runs, run_dirs, strict=True):
        if repeated[run.label] > 1:
            run.label = f"{run.label} ({Path(run_dir).name})"
    return runs


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--out", type=Path, default=Path("runs.png"), help="the PNG to write (default runs.png)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        check_out(args.out, kind="file")
        runs = read_runs(args.run_dirs)
    except (FileNotFoundError, ValueError) as error:
        print(f"flatmin plot: error: {error}", file=sys.stderr)
        return 2
    path = plot_runs(runs, args.out)
    print(f"wrote {path}")
    return 0
