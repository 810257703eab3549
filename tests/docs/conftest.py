"""One spawn of two gloo processes runs every ``processes=2`` block of the Markdown files
and the docstrings (starting processes that import torch is most of their cost); each block's
test then reads what its block left: ``<i>.ok``, or ``<i>.err`` with the traceback."""

from __future__ import annotations

import pytest

from flatmin.distributed import spawn
from tests.docs.blocks import MARKDOWN, docstring_blocks, markdown_blocks
from tests.docs.helpers import run_blocks_in_processes

WORLD = 2


def multi_process_blocks():
    """Every block marked ``processes=2``: Markdown files first, then docstrings."""
    blocks = [b for path in MARKDOWN for b in markdown_blocks(path)] + docstring_blocks()
    return [b for b in blocks if b.options.get("processes") and "skip" not in b.options]


@pytest.fixture(scope="session")
def multi_process_results(tmp_path_factory):
    """``{block id: None | traceback text}`` after running all of them in one group."""
    blocks = multi_process_blocks()
    for block in blocks:
        if int(block.options["processes"]) != WORLD:
            raise ValueError(f"{block.id}: only processes={WORLD} is supported")
    out = tmp_path_factory.mktemp("multi-process")
    failure = "none"
    try:
        spawn(run_blocks_in_processes, WORLD, blocks, str(out))
    except Exception as error:  # the block that failed left its traceback
        failure = f"{type(error).__name__}: {error}"
    results = {}
    for i, block in enumerate(blocks):
        error = out / f"{i}.err"
        if error.exists():
            results[block.id] = error.read_text()
        elif (out / f"{i}.ok").exists():
            results[block.id] = None
        else:
            results[block.id] = f"not run; the group failed with {failure}"
    return results
