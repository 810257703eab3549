"""Every code block of README.md and of the site's pages (docs/*.md) runs, as a new reader
would run it (tests/docs/helpers.py).

Python blocks run in file order with their markers' set-ups; shell blocks run their
``flatmin`` commands at reduced sizes in one directory per file, in file order, so a
command that needs an earlier command's run directory gets it only if the file creates
it. Blocks that cannot run here (``make test`` is this suite) say why in their marker.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatmin.cli import build_parser, main
from tests.docs.blocks import MARKDOWN, PYTHON, ROOT, SHELL, SRC, Block, markdown_blocks
from tests.docs.helpers import (
    flatmin_arguments,
    namespace_for,
    reduced,
    run_python,
    shell_commands,
)
from tests.helpers import write_fashion_mnist

BLOCKS = [block for path in MARKDOWN for block in markdown_blocks(path)]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in PYTHON]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]
COMMANDS = [(b, line, argv) for b in SHELL_BLOCKS for line, argv in shell_commands(b)]
_namespaces: dict[int, dict | None] = {}  # index in PYTHON_BLOCKS -> namespace after it ran
_named: dict[str, dict] = {}


def test_every_block_is_run_or_says_why_not():
    """A block that is neither Python nor shell (or an indented block) would be left out
    without a word: it must carry a ``skip="why"`` marker."""
    left_out = [
        f"{b.id} ({b.lang})"
        for b in BLOCKS
        if b.lang not in (*PYTHON, *SHELL) and "skip" not in b.options
    ]
    assert left_out == []


def _skip_unless_runnable(block: Block) -> None:
    if "skip" in block.options:
        pytest.skip(block.options["skip"])
    module = block.options.get("requires")
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module}, which is not installed")


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)), ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block(index, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes goes there
    block = PYTHON_BLOCKS[index]
    _namespaces[index] = None
    _skip_unless_runnable(block)
    if "processes" in block.options:
        error = request.getfixturevalue("multi_process_results")[block.id]
        assert error is None, error
        return
    previous = PYTHON_BLOCKS[index - 1] if index else None
    same_file = previous is not None and previous.path == block.path
    namespace = namespace_for(block, _namespaces.get(index - 1) if same_file else None, _named)
    _namespaces[index] = run_python(block, namespace)
    if "name" in block.options:
        _named[block.options["name"]] = dict(_namespaces[index])


@pytest.fixture(scope="module")
def shell_dirs(tmp_path_factory):
    """``dirs(path)``: the directory every command of that file runs in, in file order
    (runs/ accumulates), with fake Fashion-MNIST files (given as --data-dir to commands
    that train on it)."""
    made: dict[Path, Path] = {}

    def directory(path: Path) -> Path:
        if path not in made:
            made[path] = tmp_path_factory.mktemp(f"shell-{path.stem}")
            write_fashion_mnist(made[path] / "fashion-mnist", n_train=256, n_test=64)
        return made[path]

    return directory


def _slow(argv: list[str]) -> bool:
    args = flatmin_arguments(argv) or []
    return argv[0] == "torchrun" or args[:1] == ["bench"] or "--nproc" in args


@pytest.mark.parametrize(
    "block, line, argv",
    [pytest.param(b, n, a, marks=[pytest.mark.slow] if _slow(a) else []) for b, n, a in COMMANDS],
    ids=[f"{b.path.name}:{n}:{' '.join(a[:3])}" for b, n, a in COMMANDS],
)
def test_shell_command(block: Block, line: int, argv: list[str], shell_dirs, monkeypatch, capsys):
    shell_dir = shell_dirs(block.path)
    _skip_unless_runnable(block)
    args = flatmin_arguments(argv)
    if args is None and argv[:1] != ["python"]:
        pytest.fail(f"{block.path.name}:{line}: cannot run {argv[0]!r}; mark its block skip=...")
    if "parse" in block.options:  # run elsewhere (the marker says where): the flags must exist
        parser, _ = build_parser(args)
        parser.parse_args(args)  # SystemExit(2) on an unknown or mistyped flag
        return
    argv = reduced(argv, shell_dir / "fashion-mnist")
    where = f"{block.path.name}:{line}: {' '.join(argv)}"
    if argv[0] == "flatmin":  # in this process: the command's own main(), as the script runs it
        monkeypatch.chdir(shell_dir)
        threads = torch.get_num_threads()
        try:
            status = main(argv[1:])
        except SystemExit as exit:  # argparse's --help and its usage errors
            status = exit.code
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        assert status in (0, None), f"{where}\n{out[-3000:]}\n{err[-3000:]}"
        return
    if argv[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        command = [sys.executable, *argv[1:]]
        command[1] = str(ROOT / command[1])  # python benchmarks/x.py: the repository's file
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        command, cwd=shell_dir, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{where}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
