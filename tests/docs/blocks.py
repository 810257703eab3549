"""The code blocks of the documentation: README.md, the site's pages and the docstrings.

A small extractor of our own rather than a plugin: pytest-markdown-docs pins
``markdown-it-py<4`` (the docs' myst-parser needs 4), and neither it nor pytest-examples
reads reStructuredText docstrings, continues from a *named* earlier block, or runs a block
in two processes.

**Markdown** (README.md and the site's pages, docs/*.md): fenced blocks, and indented
blocks (reported so that none is left out unnoticed); MyST directives are not code. A marker on the line right before a block says how to run it; it is
an HTML comment, so GitHub does not show it, but a reader of the file sees it::

    <!-- test: setup=model -->          run SETUPS["model"] first (the code is below)
    <!-- test: continue -->             the same namespace as the previous python block
    <!-- test: name=loop -->            keep this block's namespace under a name ...
    <!-- test: continue=loop -->        ... and start from a copy of it
    <!-- test: processes=2 -->          run in 2 gloo processes (flatmin.distributed.spawn)
    <!-- test: script -->               run as a script, ``python example.py`` (spawn's own
                                        examples: their functions must be importable)
    <!-- test: check="saf.active" -->   afterwards, this expression must be true
    <!-- test: requires=lightning -->   skipped, saying so, when the module is missing
    <!-- test: ignore="regex;regex" --> warnings whose message matches are not errors (a
                                        framework's notices about its own set-up)
    <!-- test: skip="why" -->           not run; pytest prints the reason
    <!-- test: parse="why" -->          flatmin commands parsed by the real parser, not run
                                        (the reason names what runs them)

**Docstrings** (src/flatmin, read with ast: nothing is imported to collect them): every
``::`` literal block and every ``>>>`` block is an example. The marker is an RST comment
before the paragraph, which Sphinx does not render: ``.. test: setup=model``. A literal
block that is not Python says so (``.. code-block:: text``, or ``.. test: shell``), so no
example is silently left out.
"""

from __future__ import annotations

import ast
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import flatmin

SRC = Path(flatmin.__file__).resolve().parents[1]  # the src/ directory under test
ROOT = SRC.parent
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README and the site's pages

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*(?:<!--|\.\.)\s*test:(?P<body>.*?)(?:-->)?\s*$")
PYTHON = ("python", "py", "pycon")
SHELL = ("bash", "sh", "shell", "console")


@dataclass
class Block:
    """One code block: where it is, its language, its code and its marker's options."""

    path: Path
    line: int  # 1-based line of the block's first code line
    lang: str  # "python", "bash", "text", ...; "indented" for a 4-space Markdown block
    code: str
    options: dict[str, str] = field(default_factory=dict)
    owner: str = ""  # docstrings: the module, class or function the block documents

    @property
    def id(self) -> str:
        where = self.path.relative_to(SRC) if self.path.is_relative_to(SRC) else self.path.name
        return f"{where}:{self.line}"

    @property
    def is_doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")


def parse_marker(line: str) -> dict[str, str] | None:
    """The options of a ``test:`` marker line, or None if the line is not one."""
    match = MARKER.match(line)
    if match is None:
        return None
    options = {}
    for token in shlex.split(match["body"]):
        key, _, value = token.partition("=")
        options[key] = value or "yes"
    return options


def markdown_blocks(path: Path) -> list[Block]:
    """Fenced and indented code blocks of a Markdown file, in order, with their markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    marker: dict[str, str] = {}
    in_list = False
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            close = fence["indent"] + fence["fence"]
            end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == close)
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            lang = (fence["info"].split() or ["text"])[0]
            if not lang.startswith("{"):  # MyST directives ({eval-rst}, {toctree}) are no code
                blocks.append(Block(path, i + 2, lang, code, marker))
            marker, i = {}, end + 1
            continue
        after_blank = i == 0 or not lines[i - 1].strip()
        if line.startswith("    ") and after_blank and not in_list:
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            code = textwrap.dedent("\n".join(lines[i:end])).strip("\n")
            blocks.append(Block(path, i + 1, "indented", code, marker))
            marker, i = {}, end
            continue
        parsed = parse_marker(line)
        if parsed is not None:
            marker = parsed
        elif line.strip():
            marker = {}  # a marker applies to the block right after it only
            in_list = bool(re.match(r"\s*([-*+]|\d+\.)\s", line)) or (
                in_list and line.startswith(" ")
            )
        i += 1
    return blocks


def _docstring_examples(doc: str) -> list[tuple[int, str, str, dict[str, str]]]:
    """``(line offset, kind, code, marker)`` of each ``::`` literal block and ``>>>`` block
    of a cleaned docstring; kind is "literal", "doctest" or the code-block's language."""
    lines = doc.splitlines()
    out: list[tuple[int, str, str, dict[str, str]]] = []
    marker: dict[str, str] = {}

    def block_end(start: int, base: int) -> int:
        j = start
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base
        ):
            j += 1
        return j

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        base = len(line) - len(line.lstrip())
        parsed = parse_marker(line)
        if parsed is not None:
            marker = parsed
            i += 1
            continue
        if stripped.startswith(">>>"):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out.append((i, "doctest", textwrap.dedent("\n".join(lines[i:j])), marker))
            marker, i = {}, j
            continue
        directive = re.match(r"\.\. (code-block|code|sourcecode)::\s*(\w*)", stripped)
        if directive or (stripped.endswith("::") and not stripped.startswith(".. ")):
            j = block_end(i + 1, base)
            code = textwrap.dedent("\n".join(lines[i + 1 : j])).strip("\n")
            if directive:  # skip the directive's options (":caption: ...")
                code = "\n".join(c for c in code.splitlines() if not c.startswith(":"))
                code = textwrap.dedent(code).strip("\n")
            kind = directive[2] if directive else "literal"
            if code:
                first = next(k for k in range(i + 1, j) if lines[k].strip())
                out.append((first, kind or "literal", code, marker))
            marker, i = {}, j
            continue
        i += 1  # a marker holds until the next example (it may precede its paragraph)
    return out


def docstring_blocks(root: Path = SRC / "flatmin") -> list[Block]:
    """Examples in every module, class and function docstring under ``root``."""
    blocks = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for node, owner in _documented(tree, module):
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            start = node.body[0].lineno  # the docstring's first line (its text starts there)
            for offset, kind, code, marker in _docstring_examples(doc):
                lang = kind
                if kind == "literal":
                    lang = "python" if _compiles(code) else "unknown"
                if "shell" in marker:
                    lang = "bash"
                blocks.append(Block(path, start + offset, lang, code, marker, owner))
    return blocks


def _documented(tree: ast.Module, module: str):
    """``(node, dotted name)`` of the module and every class and function in it."""
    yield tree, module
    stack = [(node, module) for node in tree.body]
    while stack:
        node, prefix = stack.pop(0)
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}.{node.name}"
            yield node, name
            stack.extend((child, name) for child in node.body)


def _compiles(code: str) -> bool:
    try:
        compile(code, "<example>", "exec")
    except SyntaxError:
        return False
    return True
