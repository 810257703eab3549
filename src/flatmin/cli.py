"""The ``flatmin`` command line: ``flatmin train | bench | measure | plot``.

Each sub-command lives in the module that owns its idea and exposes two functions,
``configure(parser)`` (adds its arguments) and ``run(args) -> int`` (does the work and
returns the exit status). This file only wires them together, so importing the CLI
does not import the trainer, matplotlib or the benchmarks until a command needs them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

_COMMANDS = {
    "train": ("flatmin.train.command", "train a model with any registered method"),
    "bench": ("flatmin.bench.command", "speed and accuracy benchmarks, side by side"),
    "measure": ("flatmin.measure.command", "sharpness diagnostics of a checkpoint"),
    "plot": ("flatmin.measure.plot_command", "overlay the metrics of training runs"),
}


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(
        prog="flatmin", description=__doc__.splitlines()[0].replace("``", "")
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in _COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure(sub_parser)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
