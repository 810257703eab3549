"""``.. flatmin-help:: train`` inserts the text of ``flatmin train --help``.

The option lists on the command-line page are the parsers' own, so they cannot drift
from the code; a command that fails to build its parser fails the docs build.
"""

from __future__ import annotations

import argparse
import os

from docutils import nodes
from docutils.parsers.rst import Directive


class FlatminHelp(Directive):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from flatmin.cli import build_parser

        command = self.arguments[0]
        parser, _ = build_parser([command])
        (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        os.environ["COLUMNS"] = "88"  # argparse wraps at the terminal's width
        text = subparsers.choices[command].format_help().replace("``", "")
        return [nodes.literal_block(text, text, language="text")]


def setup(app) -> dict:
    app.add_directive("flatmin-help", FlatminHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
