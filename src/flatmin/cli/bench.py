"""``flatmin bench``: run a benchmark preset (``--preset demo``) or mode (``speed``, …).

Each benchmark is a function here that checks its options, calls the benchmark's
module in ``flatmin.bench`` and prints what it found; it is listed in
``PRESETS`` or ``MODES`` with a one-line description. The options every
benchmark shares (output directory, seeds, epochs, threads, progress bars) are defined
once, each benchmark's own in a group of its own. Bad options and an output directory
that cannot be written end the command with one line and exit status 2, before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flatmin.bench.accuracy import plan, run_study
from flatmin.bench.demo import DemoPreset, plot, run_demo, table, write_summary
from flatmin.bench.figures import draw_figures
from flatmin.bench.fsdp import format_speed as format_fsdp_speed
from flatmin.bench.fsdp import fsdp_speed, sharded_store
from flatmin.bench.report import report
from flatmin.bench.speed import results_header, run_speed, write_speed
from flatmin.bench.studies import STUDIES, study
from flatmin.bench.topk import (
    format_memmap,
    format_memory,
    memmap_store,
    memory_table,
    store_speed,
)
from flatmin.bench.workload import CASES
from flatmin.cli._out import check_out
from flatmin.train.registry import METHODS

PRESETS = {"demo": "SGD, SAM, SAF and MESA on MNIST-1D with 40 % label noise, 3 seeds"}
MODES = {
    "speed": "images/s of every registered method relative to SGD, interleaved in one process",
    "accuracy": "multi-seed accuracy and sharpness of every method, paired by seed",
    "figures": "the SAF paper's figures (loss, sharpness per epoch, noise, surfaces) from runs",
    "topk-speed": "SAF's top-k store against full rows: look-up + term per step, interleaved",
    "topk-memory": "SAF's store bytes: full, the paper's and top-k layouts; a memory-mapped "
    "top-k store on disk",
    "fsdp-speed": "step time of SAM and SAF under FSDP2 against DDP, interleaved in one group",
    "sharded-store": "SAF's sharded store against the replicated one: bytes per process and "
    "the cost of a look-up at several numbers of processes",
}


class BenchError(ValueError):
    """A benchmark's options or inputs that cannot be used (printed as one line)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    entries = {**PRESETS, **MODES}
    parser.add_argument(
        "benchmark",
        nargs="?",
        choices=sorted(entries),
        # argparse formats help strings with %
        help="; ".join(f"{n}: {d}" for n, d in entries.items()).replace("%", "%%"),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the same, for presets")
    parser.add_argument("--mode", choices=sorted(MODES), help="the same, for modes")
    common = parser.add_argument_group("common options")
    common.add_argument("--out", metavar="DIR", help="where runs, tables and plots go")
    common.add_argument("--seeds", type=int, metavar="N", help="number of seeds (0, 1, …)")
    common.add_argument("--epochs", type=int, help="epochs per run (default: the preset's)")
    common.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads to use (default: 2; the demo trains this many runs at once, "
        "one thread each)",
    )
    common.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only on a terminal)",
    )
    _speed_options(parser.add_argument_group("speed options"))
    _accuracy_options(parser.add_argument_group("accuracy options"))
    _figures_options(parser.add_argument_group("figures options"))
    _topk_options(parser.add_argument_group("topk-speed / topk-memory options"))
    _fsdp_options(parser.add_argument_group("fsdp-speed / sharded-store options"))


def run(args: argparse.Namespace) -> int:
    chosen = [name for name in (args.benchmark, args.preset, args.mode) if name is not None]
    if len(set(chosen)) != 1:
        return _error(
            "name one benchmark, e.g. `flatmin bench --preset demo`; "
            f"presets: {', '.join(PRESETS)}; modes: {', '.join(MODES)}"
        )
    runners: dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": _demo, "speed": _speed, "accuracy": _accuracy, "figures": _figures,
        "topk-speed": _topk_speed, "topk-memory": _topk_memory,
        "fsdp-speed": _fsdp_speed, "sharded-store": _sharded_store,
    }  # fmt: skip
    try:
        return runners[chosen[0]](args)
    except (BenchError, FileNotFoundError) as error:
        return _error(str(error), chosen[0])


def _error(message: str, benchmark: str | None = None) -> int:
    name = f"flatmin bench {benchmark}" if benchmark else "flatmin bench"
    print(f"{name}: error: {message}", file=sys.stderr)
    return 2


def _out(path: str | Path, flag: str = "--out") -> Path:
    """The output directory ``path``, refused (:class:`BenchError`) if it cannot be one."""
    try:
        check_out(Path(path), flag=flag)
    except ValueError as error:
        raise BenchError(str(error)) from None
    return Path(path)


def _command(args: argparse.Namespace) -> str:
    return " ".join(getattr(args, "argv", None) or ["flatmin", *sys.argv[1:]])


def _print(line: str) -> None:
    print(line, flush=True)


# --- demo -----------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    preset = DemoPreset()
    seeds = preset.seeds if args.seeds is None else args.seeds
    epochs = preset.epochs if args.epochs is None else args.epochs
    processes = args.threads
    if seeds < 1 or epochs < 1 or processes < 1:
        raise BenchError("--seeds, --epochs and --threads must be >= 1")
    out = _out(args.out if args.out is not None else "runs/demo")
    title = (
        f"MNIST-1D, {preset.label_noise:.0%} symmetric label noise, {preset.model}, "
        f"{epochs} epochs, {seeds} seed{'s' if seeds > 1 else ''}"
    )
    print(f"flatmin demo: {title}; {processes} run(s) at a time, one thread each")
    print(preset.scaling_note)
    started = time.perf_counter()
    if processes <= 1:
        torch.set_num_threads(1)
    results = run_demo(preset, out, seeds=seeds, epochs=epochs, processes=processes,
                       progress=args.progress, log=_print)  # fmt: skip
    elapsed = time.perf_counter() - started
    text = table(results)
    cpu = sum(r.cpu_seconds for r in results)
    plot(results, out / "demo.png", title, preset.term_start_marker())
    summary = write_summary(out, title, text, preset.scaling_note, elapsed, processes, cpu)
    print(f"\n{text}\n")
    print(
        f"{elapsed:.0f} s in total; the runs used {cpu:.0f} CPU-seconds (≈ {cpu / processes:.0f}"
        f" s on {processes} idle core(s)); plot: {out / 'demo.png'}; table: {summary}"
    )
    return 0


# --- speed ----------------------------------------------------------------------------


def _speed_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--models", nargs="+", choices=tuple(CASES), default=list(CASES),
                       help="models to time (default: all three)")  # fmt: skip
    group.add_argument(
        "--methods", nargs="+", metavar="NAME", help="methods to time (default: every registered)"
    )
    group.add_argument(
        "--repeats", type=int, default=5, help="counted interleaved rounds (default: 5)"
    )
    group.add_argument("--steps", type=int, help="steps per block (default: per model)")
    group.add_argument("--batch-size", type=int, help="batch size (default: per model)")
    group.add_argument("--profile", metavar="METHOD", help="also profile one block of METHOD")
    group.add_argument(
        "--channels-last-inputs",
        action="store_true",
        help="image batches in channels_last (weights stay as built, NCHW)",
    )
    group.add_argument(
        "--measure-memory",
        action="store_true",
        help="also measure each method's peak resident memory over SGD's, one process per "
        "method and model (flatmin.bench.memory)",
    )


def _speed(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    for flag, value in (("--repeats", args.repeats), ("--steps", args.steps),
                        ("--batch-size", args.batch_size)):  # fmt: skip
        if value is not None and value < 1:
            raise BenchError(f"{flag} must be an integer >= 1, got {value}")
    out = _out(args.out or "benchmarks/results")
    torch.set_num_threads(args.threads)
    try:
        text, data = run_speed(
            args.models, args.methods, repeats=args.repeats, steps=args.steps,
            batch_size=args.batch_size, profile_method=args.profile,
            channels_last_inputs=args.channels_last_inputs,
            measure_peak_memory=args.measure_memory, command=_command(args), log=_print,
        )  # fmt: skip
    except ValueError as error:
        raise BenchError(str(error)) from None
    print(text)
    stem = f"speed_{'-'.join(args.models)}_t{args.threads}"
    if args.channels_last_inputs:
        stem += "_cl"
    print(f"wrote {write_speed(out, text, data, stem)}")
    return 0


# --- accuracy -------------------------------------------------------------------------


def _accuracy_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--study", choices=sorted(STUDIES), default="quick", help="accuracy study preset"
    )
    group.add_argument(
        "--sections",
        nargs="+",
        metavar="NAME",
        help="run (and report) only these sections of the study; their tables go to "
        "accuracy_STUDY_SECTION[_SECTION…].txt",
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


def _accuracy(args: argparse.Namespace) -> int:
    sections = study(args.study)
    if args.sections:
        unknown = sorted(set(args.sections) - {s.name for s in sections})
        if unknown:
            raise BenchError(
                f"unknown sections {unknown}; the {args.study} study has: "
                + ", ".join(s.name for s in sections)
            )
        sections = tuple(s for s in sections if s.name in args.sections)
    root = Path(args.out or f"runs/bench-accuracy-{args.study}")
    _out(args.results, "--results")
    if not args.report:  # --report only reads the runs
        _out(root)
    jobs, missing = plan(sections, METHODS, args.seeds)
    if not args.report:
        print(f"{len(jobs)} runs in {root}; not registered (left out): {missing or 'none'}")
        started = time.perf_counter()
        skipped = run_study(jobs, root, args.threads, args.epochs, log=_print)
        print(f"done in {time.perf_counter() - started:.0f} s; {skipped} left to other workers")
    text, data = report(root, sections if args.sections else study(args.study), missing)
    name = "_".join([f"accuracy_{args.study}", *(args.sections or ())])
    stem = Path(args.results) / name
    if not data["sections"]:
        raise BenchError(
            f"no finished runs of the {args.study} study in {root} (no final.json): "
            f"nothing to report; {stem}.txt and .json are left as they are"
        )
    command = _command(args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".txt").write_text(f"# {command}\n# runs: {root}\n\n{text}")
    stem.with_suffix(".json").write_text(json.dumps({"command": command, **data}, indent=1))
    print(text)
    return 0


# --- figures --------------------------------------------------------------------------


def _figures_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--runs",
        metavar="DIR",
        default="runs/bench-accuracy-quick",
        help="the accuracy study's run directory (default: runs/bench-accuracy-quick)",
    )
    group.add_argument(
        "--section", default="mnist1d-noise40", help="which section to draw (default: MNIST-1D)"
    )
    group.add_argument("--surface-steps", type=int, default=21, help="grid points per axis")
    group.add_argument("--prefix", default="", help="prefix of the file names (e.g. 'fmnist_')")


def _figures(args: argparse.Namespace) -> int:
    if args.surface_steps < 2:
        raise BenchError(f"--surface-steps must be an integer >= 2, got {args.surface_steps}")
    out = _out(args.out or "benchmarks")
    started = time.perf_counter()
    for path in draw_figures(Path(args.runs) / args.section, out, args.surface_steps, args.prefix):
        print(path)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


# --- topk-speed, topk-memory ----------------------------------------------------------


def _topk_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000],
                       help="numbers of classes C (default: 10 100 1000)")  # fmt: skip
    group.add_argument("--top-k", nargs="+", type=int, default=[1, 5, 10, 20], dest="top_k",
                       help="the k of the top-k stores (default: 1 5 10 20; topk-memory: "
                       "5 10 20)")  # fmt: skip
    group.add_argument("--samples", type=int, default=10_240,
                       help="topk-speed: samples per store, one epoch a block (default: 10240)")  # fmt: skip
    group.add_argument(
        "--memmap-samples",
        type=int,
        default=0,
        help="topk-memory: also fill a memory-mapped top-k store of this many samples "
        "(1000 classes, k = 10) in --out and measure its file (deleted after; default: 0, no)",
    )


def _positive(**values: int | None) -> None:
    for flag, value in values.items():
        if value is not None and value < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be an integer >= 1, got {value}")


def _topk_speed(args: argparse.Namespace) -> int:
    _positive(threads=args.threads, repeats=args.repeats, samples=args.samples,
              batch_size=args.batch_size, classes=min(args.classes), top_k=min(args.top_k))  # fmt: skip
    out = _out(args.out or "benchmarks/results")
    torch.set_num_threads(args.threads)
    lines = [results_header(_command(args))]
    print(lines[0], flush=True)
    started = time.perf_counter()
    try:
        data = store_speed(args.classes, args.top_k, batch=args.batch_size or 128,
                           samples=args.samples, repeats=args.repeats,
                           log=lambda text: (lines.append(text), _print(text)))  # fmt: skip
    except ValueError as error:
        raise BenchError(str(error)) from None
    lines.append(f"wall time {time.perf_counter() - started:.0f} s")
    print(lines[-1])
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"topk_speed_t{args.threads}"
    stem.with_suffix(".txt").write_text("\n\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"command": _command(args), **data}, indent=1))
    print(f"wrote {stem.with_suffix('.txt')}")
    return 0


def _topk_memory(args: argparse.Namespace) -> int:
    ks = args.top_k if args.top_k != [1, 5, 10, 20] else [5, 10, 20]
    _positive(top_k=min(ks), threads=args.threads)
    torch.set_num_threads(args.threads)
    if args.memmap_samples < 0:
        raise BenchError(f"--memmap-samples must be >= 0, got {args.memmap_samples}")
    out = _out(args.out or "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    table = memory_table(ks)
    lines = [results_header(_command(args)), format_memory(table, ks, lag=3)]
    data: dict = {"command": _command(args), "table": table}
    if args.memmap_samples:
        data["memmap"] = memmap_store(out / "topk_memmap_store.bin", samples=args.memmap_samples)
        lines.append(format_memmap(data["memmap"]))
    text = "\n\n".join(lines) + "\n"
    print(text)
    (out / "topk_memory.txt").write_text(text)
    (out / "topk_memory.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {out / 'topk_memory.txt'}")
    return 0


# --- fsdp-speed, sharded-store ----------------------------------------------------------


def _fsdp_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--processes", type=int, default=2,
                       help="fsdp-speed: gloo processes (default: 2)")  # fmt: skip
    group.add_argument("--fsdp-models", nargs="+", default=["mlp", "cnn"], metavar="NAME",
                       help="fsdp-speed: the trainer's models, on 28x28 images (default: mlp cnn)")  # fmt: skip
    group.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4], metavar="W",
                       help="sharded-store: numbers of processes (default: 1 2 4)")  # fmt: skip
    group.add_argument("--store-cases", nargs="+", default=["50000x10", "20000x1000"],
                       metavar="NxC", help="sharded-store: samples x classes "
                       "(default: 50000x10 20000x1000)")  # fmt: skip


def _write(out: Path, args: argparse.Namespace, stem: str, lines: list[str], data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.txt").write_text("\n\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"command": _command(args), **data}, indent=1))
    print(f"wrote {out / stem}.txt")


def _fsdp_speed(args: argparse.Namespace) -> int:
    """``--threads`` per process; ``--batch-size`` per process."""
    _positive(threads=args.threads, repeats=args.repeats, steps=args.steps,
              batch_size=args.batch_size)  # fmt: skip
    if args.processes < 2:
        raise BenchError(f"--processes must be >= 2, got {args.processes}")
    out = _out(args.out or "benchmarks/results")
    lines = [results_header(_command(args), threads=False)]
    print(lines[0], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        data = fsdp_speed(args.fsdp_models, processes=args.processes, batch=args.batch_size or 64,
                          rounds=args.repeats, steps=args.steps or 4, threads=args.threads,
                          scratch=out)  # fmt: skip
    except ValueError as error:
        raise BenchError(str(error)) from None
    lines.append(format_fsdp_speed(data))
    print(lines[-1])
    _write(out, args, f"fsdp_speed_t{args.threads}", lines, data)
    return 0


def _sharded_store(args: argparse.Namespace) -> int:
    """``--threads`` per process; ``--batch-size`` rows per process and call."""
    _positive(threads=args.threads, repeats=args.repeats, batch_size=args.batch_size,
              worlds=min(args.worlds))  # fmt: skip
    try:
        cases = [tuple(int(n) for n in case.lower().split("x")) for case in args.store_cases]
        if any(len(case) != 2 or min(case) < 1 for case in cases):
            raise ValueError
    except ValueError:
        raise BenchError(
            f"--store-cases takes NxC pairs such as 50000x10, got {args.store_cases}"
        ) from None
    out = _out(args.out or "benchmarks/results")
    lines = [results_header(_command(args), threads=False)]
    print(lines[0], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    data = sharded_store(args.worlds, cases, batch=args.batch_size or 128, calls=args.repeats,
                         threads=args.threads, scratch=out,
                         log=lambda text: (lines.append(text), _print(text)))  # fmt: skip
    _write(out, args, f"sharded_store_t{args.threads}", lines, data)
    return 0
