"""Every script in examples/ runs to the end at tiny size (``--tiny``) in a fresh process.

A script whose framework is not installed here is skipped with the reason; timm's needs
a torchvision built for the installed torch, so it skips where that import fails.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# script -> (the module it needs besides flatmin, what it prints)
SCRIPTS = {
    "plain_loop.py": (None, "plain loop + SAM"),
    "compile_model.py": (None, "compiled model + SAM"),
    "ddp.py": (None, "DDP (2 processes) + SAM"),
    "lightning_sam.py": ("pytorch_lightning", "Lightning + SAM + SAF"),
    "accelerate_sam.py": ("accelerate", "accelerate + SAM"),
    "transformers_trainer.py": ("transformers", "transformers Trainer + SAM + MESA"),
    "timm_registry.py": ("timm", "timm factory + SAM"),
}


def test_every_example_is_listed():
    scripts = {p.name for p in EXAMPLES.glob("*.py")} - {"digits.py"}
    assert scripts == set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_at_tiny_size(script):
    needs, prints = SCRIPTS[script]
    if needs is not None:
        try:
            importlib.import_module(needs)
        except Exception as error:  # timm with a mismatched torchvision: RuntimeError
            pytest.skip(f"{needs} cannot be imported here ({type(error).__name__}: {error})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith(prints))
    accuracy = float(line.rsplit(" ", 1)[-1])
    assert 0.0 <= accuracy <= 1.0
