"""``flatmin bench``: run a benchmark preset (``--preset demo``) or mode (``speed``, …).

Each preset or mode is a module with ``DESCRIPTION`` (one line), ``run(args) -> int``
and optionally ``add_arguments(group)`` for options of its own; it is listed in
:data:`PRESETS` or :data:`MODES` and imported only when chosen. The options every
benchmark shares (output directory, seeds, epochs, threads, progress bars) are defined
here once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

# name → module; a new benchmark is one line here plus its module.
PRESETS: dict[str, str] = {"demo": "flatmin.bench.demo"}
MODES: dict[str, str] = {
    "speed": "flatmin.bench.speed",
    "accuracy": "flatmin.bench.accuracy",
    "figures": "flatmin.bench.figures",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(name)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    entries = {**PRESETS, **MODES}
    parser.add_argument(
        "benchmark",
        nargs="?",
        choices=sorted(entries),
        help="; ".join(f"{n}: {_load(m).DESCRIPTION}" for n, m in entries.items()).replace(
            "%",
            "%%",  # argparse formats help strings with %
        ),
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
    for name, module_name in {**PRESETS, **MODES}.items():
        module = _load(module_name)
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(f"{name} options"))


def run(args: argparse.Namespace) -> int:
    chosen = [name for name in (args.benchmark, args.preset, args.mode) if name is not None]
    if len(set(chosen)) != 1:
        print(
            "flatmin bench: error: name one benchmark, e.g. `flatmin bench --preset demo`; "
            f"presets: {', '.join(PRESETS)}; modes: {', '.join(MODES)}",
            file=sys.stderr,
        )
        return 2
    return int(_load({**PRESETS, **MODES}[chosen[0]]).run(args) or 0)
