"""The ``flatmin`` command line: ``flatmin train | bench | measure | plot``.

Each command is a module of this package with two functions, ``configure(parser)``
(adds its arguments) and ``run(args) -> int`` (does the work, prints, returns the exit
status). Only the chosen command's module is imported, so ``flatmin plot`` does not
load the trainer and ``flatmin --help`` loads nothing. ``python -m flatmin.cli`` is the
same program (``torchrun ... -m flatmin.cli train ...`` uses it).

A command that needs an optional dependency which is not installed exits with one line
naming the extra to install, e.g. ``pip install 'flatmin[train]'``.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

_COMMANDS = {
    "train": ("flatmin.cli.train", "train a model with any registered method"),
    "bench": ("flatmin.cli.bench", "speed and accuracy benchmarks, side by side"),
    "measure": ("flatmin.cli.measure", "sharpness diagnostics of a checkpoint"),
    "plot": ("flatmin.cli.plot", "overlay the metrics of training runs"),
}
# Optional dependencies → the extra that installs them (pyproject.toml).
EXTRAS = {"tqdm": "train", "mnist1d": "train", "sklearn": "train", "matplotlib": "plot"}


def plain_text(rst: str) -> str:
    """A line of reStructuredText as a terminal shows it: no literal quotes, no roles."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", rst).replace("``", "")


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, object | None]:
    """The parser, with the arguments of the command named in ``argv`` (and its module)."""
    parser = argparse.ArgumentParser(
        prog="flatmin", description=plain_text(__doc__.splitlines()[0])
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in _COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure(sub_parser)
            sub_parser.description = plain_text(sub_parser.description or help_text)
    return parser, module


def missing_extra(error: ImportError) -> str | None:
    """The one-line advice when ``error`` (or an import error it was raised from) is an
    optional dependency that is not installed; ``None`` for any other import error."""
    cause: BaseException | None = error
    while cause is not None:
        top = (getattr(cause, "name", None) or "").split(".")[0]
        if isinstance(cause, ModuleNotFoundError) and top in EXTRAS:
            return f"this needs the optional package {top!r}: pip install 'flatmin[{EXTRAS[top]}]'"
        cause = cause.__cause__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "flatmin")
    try:
        parser, module = build_parser(argv)
        args = parser.parse_args(argv)
        if module is None:
            parser.print_help()
            return 2
        return int(module.run(args) or 0)
    except ImportError as error:
        advice = missing_extra(error)
        if advice is None:
            raise
        print(f"flatmin {command}: error: {advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
