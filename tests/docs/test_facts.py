"""Facts the documentation states that no executed block checks by itself."""

from __future__ import annotations

import re
import shlex

from tests.docs.blocks import MARKDOWN, README, ROOT, SRC, markdown_blocks
from tests.docs.helpers import shell_commands


def test_the_torch_versions_the_readme_names_are_the_ones_the_set_up_installs():
    script = (ROOT / "scripts" / "setup_venv.sh").read_text()
    installed = set(re.findall(r"torch(?:==|>=)[\d.]+", script))
    assert installed, "scripts/setup_venv.sh no longer names a torch version"
    readme = README.read_text()
    named = set(re.findall(r"torch(?:==|>=)[\d.]+", readme))
    assert named == installed
    assert not re.search(r"torch \d+\.\d+", readme), "a bare 'torch X.Y' the script may not install"


def test_nothing_shipped_cites_the_unshipped_reference_notes():
    citing = [p for p in (SRC / "flatmin").rglob("*.py") if "REFERENCE.md" in p.read_text()]
    assert citing == []


def test_every_plotted_run_is_trained_earlier_in_the_same_file_with_tracked_sharpness():
    """`flatmin plot A B` shows sharpness only for runs trained with --track-sharpness,
    and only runs that the same file's commands create exist for its reader."""
    for path in MARKDOWN:
        trained: dict[str, list[str]] = {}
        for block in markdown_blocks(path):
            if block.lang != "bash":
                continue
            for line, argv in shell_commands(block):
                args = argv[1:] if argv[:1] == ["flatmin"] else []
                if args[:1] == ["train"] and "--out" in args and "--resume" not in args:
                    trained[args[args.index("--out") + 1]] = args
                if args[:1] == ["plot"]:
                    plotted = args[1 : args.index("--out")] if "--out" in args else args[1:]
                    for run in plotted:
                        assert run in trained, f"{path.name}:{line}: nothing trains {run}"
                        assert "--track-sharpness" in trained[run], f"{path.name}:{line}: {run}"


def test_the_cli_examples_in_docstrings_parse():
    """Shell examples in docstrings are not run (the README runs the same commands), but
    their flags must exist: each one is parsed by the command's real parser."""
    from flatmin.cli import build_parser
    from tests.docs.blocks import docstring_blocks
    from tests.docs.helpers import flatmin_arguments

    checked = 0
    for block in docstring_blocks():
        if block.lang != "bash":
            continue
        for line in block.code.replace("\\\n", " ").splitlines():
            argv = shlex.split(line.split(" #", 1)[0])
            args = flatmin_arguments(argv) if argv else None
            if args:
                parser, _ = build_parser(args)
                parser.parse_args(args)  # SystemExit(2) on an unknown or mistyped flag
                checked += 1
    assert checked >= 4
