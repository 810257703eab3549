"""The documentation site builds with no warning (as ``make docs`` does in CI), so a
renamed function, a stale cross-reference or a broken docstring fails the suite where it
is landed, not only CI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.docs.blocks import ROOT

pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install '.[docs]')")


@pytest.mark.slow
def test_the_site_builds_offline_with_no_warning(tmp_path):
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "-n", "--keep-going", "-q",
               "-b", "html", str(ROOT / "docs"), str(tmp_path / "site")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"make docs would fail:\n{done.stderr[-6000:]}"
    pages = {p.name for p in (tmp_path / "site").glob("*.html")}
    assert {"index.html", "sam-family.html", "saf-mesa.html", "diagnostics.html",
            "distributed.html", "integrations.html", "cli.html", "pitfalls.html"} <= pages  # fmt: skip
