"""The runner catches the mistakes issue 18 found in the documentation, as written then.

Each case is a block as it stood before the fix; the runner must fail it. (The fixed
blocks are the README's and the docstrings' own, run by the other modules here.)
"""

from __future__ import annotations

import pytest
import torch

from tests.docs.blocks import README, Block, markdown_blocks
from tests.docs.helpers import namespace_for, run_python


def _run(code: str, **options: str) -> dict:
    block = Block(README, 1, "python", code, options)
    return run_python(block, namespace_for(block, None, {}))


def test_a_mesa_loop_without_set_epoch_fails_its_check():
    code = """
mesa = MESA(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(epochs):
    for x, y in loader:
        logits = model(x)
        loss = F.cross_entropy(logits, y) + mesa(x, logits)
        opt.zero_grad(); loss.backward(); opt.step()
        mesa.update()
"""
    imports = "import torch\nimport torch.nn.functional as F\nfrom flatmin import MESA\n"
    with pytest.raises(AssertionError, match=r"mesa\.active is false"):
        _run(imports + code, setup="model", check="mesa.active")
    _run(imports + code.replace("    for x, y", "    mesa.set_epoch(epoch)\n    for x, y"),
         setup="model", check="mesa.active")  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the silent fallback happens without CUDA")
def test_a_cuda_grad_scaler_on_a_cpu_fails():
    with pytest.raises(UserWarning, match="CUDA is not available"):
        _run('import torch\nscaler = torch.amp.GradScaler("cuda")')


def test_a_closure_used_before_it_is_defined_fails():
    code = """
import torch
from flatmin import LookSAM
opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, lr=0.1)
loss = opt.step(closure, model=model)
"""
    with pytest.raises(NameError, match="closure"):
        _run(code, setup="model")


def test_a_set_up_hands_over_only_the_names_it_declares():
    """`F` is imported in the set-up's code, but a block that uses it unimported fails."""
    with pytest.raises(NameError, match="'F'"):
        _run("F.cross_entropy(model(x), y)", setup="model")


def test_a_block_that_does_not_parse_fails():
    with pytest.raises(SyntaxError):
        _run("mesa = MESA(model)\n...\n        logits = model(x)\n")


def test_a_doctest_compares_its_output():
    block = Block(README, 1, "python", ">>> 1 + 1\n3\n")
    with pytest.raises(AssertionError, match="Expected"):
        run_python(block, {})


def test_markers_apply_to_the_block_right_after_them(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '<!-- test: skip="why" -->\n```python\n1\n```\n\ntext\n\n```python\n2\n```\n'
        "\n    indented\n"
    )
    blocks = markdown_blocks(page)
    assert [(b.lang, b.options) for b in blocks] == [
        ("python", {"skip": "why"}),
        ("python", {}),
        ("indented", {}),
    ]
