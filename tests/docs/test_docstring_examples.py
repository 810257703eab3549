"""Every example in a docstring of src/flatmin runs (tests/docs/blocks.py collects them).

A ``::`` literal block that compiles as Python, and every ``>>>`` block, is an example.
It runs with what ``tests.docs.helpers.example_globals`` gives it (``torch``, ``nn``,
``F``, flatmin's top-level and ``flatmin.optim`` names and its own module's public names,
as torch's docstrings assume ``import torch``) plus the set-up its ``.. test: setup=NAME``
marker names.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.docs.blocks import PYTHON, SHELL, docstring_blocks
from tests.docs.helpers import example_globals, namespace_for, run_python, run_script

BLOCKS = docstring_blocks()
EXAMPLES = [b for b in BLOCKS if b.lang in PYTHON or b.lang == "doctest"]


def test_the_examples_are_found():
    """The collector sees the examples it should (a broken collector would pass vacuously)."""
    owners = {b.owner for b in EXAMPLES}
    assert {"flatmin.optim.sam.SAM", "flatmin.trajectory.mesa.MESA"} <= owners
    assert len(EXAMPLES) >= 20


def test_every_literal_block_is_an_example_or_says_what_it_is():
    """A literal block that is not Python would be left out without a word: it must be
    declared (``.. code-block:: text``, ``.. code-block:: bash`` or ``.. test: shell``)."""
    unknown = [f"{b.id} ({b.owner})" for b in BLOCKS if b.lang == "unknown"]
    assert unknown == [], "literal blocks that are not Python; declare what they are"
    assert all(b.lang in (*PYTHON, *SHELL, "doctest", "text") for b in BLOCKS)


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=[pytest.mark.slow] if "script" in b.options else []) for b in EXAMPLES],
    ids=[b.id for b in EXAMPLES],
)
def test_docstring_example(block, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what an example writes ("runs/x") goes there
    if "skip" in block.options:
        pytest.skip(block.options["skip"])
    module = block.options.get("requires")
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module}, which is not installed")
    if "processes" in block.options:
        error = request.getfixturevalue("multi_process_results")[block.id]
        assert error is None, error
        return
    if "script" in block.options:
        run_script(block, tmp_path)
        return
    namespace = namespace_for(block, None, {}, example_globals(block))
    run_python(block, namespace)
