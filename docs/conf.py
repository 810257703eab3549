"""Sphinx configuration of flatmin's documentation site (``make docs`` → build/docs).

Why Sphinx (and not MkDocs + mkdocstrings): flatmin's docstrings are reStructuredText —
``.. math::`` blocks, ``::`` examples, ``:func:``/``:class:`` roles — with Google-style
``Args:`` sections. Sphinx (autodoc + napoleon) renders them as written; mkdocstrings
would show that markup literally unless every docstring were rewritten or converted by a
hook we would have to maintain. With ``-n`` every cross-reference is checked, so a
renamed function or a stale ``:func:`` reference fails the build. The pages themselves
are Markdown (myst-parser); the theme is furo; formulas are typeset by MathJax 3 shipped
inside the site (sphinx-mathjax-offline), so neither the build nor a reader needs the
network.

Build: ``python -m sphinx -E -W -n --keep-going -b html docs build/docs``
(-E: a fresh environment, so every page's warnings are reported on every build;
-W: warnings are errors; -n: nitpicky; --keep-going: report all of them, then fail).
No ``-j``: sphinx-mathjax-offline does not declare itself parallel-safe.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # document this checkout, not an installed copy
sys.path.insert(0, str(HERE / "_ext"))

import flatmin  # noqa: E402

project = "flatmin"
author = "flatmin contributors"
copyright = "flatmin contributors"
release = version = flatmin.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args:/Returns:/Attributes:
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax's files copied into the site: no CDN
    "myst_parser",  # pages in Markdown; docstrings stay reStructuredText
    "cli_help",  # _ext/cli_help.py: a command's own --help text on the CLI page
]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
exclude_patterns = ["README.md", "_build"]

html_theme = "furo"
html_title = f"flatmin {release}"
html_copy_source = False
html_show_sourcelink = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False  # Attributes: → .. attribute:: (a link target)
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # types go into the argument list; signatures stay short
autodoc_default_options = {"members": True}
autoclass_content = "class"
autodoc_inherit_docstrings = False  # else torch.optim.Optimizer's docstrings leak in
# timm imports torchvision, which needs a build matching torch; the docs need neither
autodoc_mock_imports = ["timm"]

nitpicky = True
nitpick_ignore_regex = [
    # torch's, numpy's and the standard library's types: linking them needs an inventory
    # from the network (intersphinx), which an offline build cannot fetch
    (r"py:class", r"(torch|numpy|np|collections\.abc|typing|argparse|os|pathlib|datetime)\..*"),
    (r"py:class", r"(nn|fx|dist|mp)\..*"),
    (r"py:class", r"(Tensor|Module|Optimizer|ProcessGroup|Path|ndarray|Generator|Callable)"),
    (r"py:class", r"(Size|Any|Iterable|Iterator|Sequence|Mapping|Literal|Dataset)"),
    (r"py:class", r"(DistributedDataParallel|GradScaler|timedelta|device|dtype)"),
    (r"py:class", r"(pytorch_lightning|lightning|accelerate|transformers|timm)\..*"),
    # flatmin's type aliases in signatures (Literal[...] and Callable[...] spelled out)
    (r"py:class", r"flatmin\..*\.(LossFn|Progress|OptimizerFactory|HyperValue|MethodFactory)"),
    (r"py:class", r"(LossFn|Progress|OptimizerFactory|StatisticsSync|Normalization|Which)"),
    (r"py:class", r"(MemoryFormatChoice|Perturbation|HyperValue|MethodFactory)"),
]
