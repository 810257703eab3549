"""Executed documentation: the code blocks of README.md and of the docstrings, and how to run them.

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

**Running.** Python blocks run with every warning an error, so a snippet that "works"
while torch silently disables something (``GradScaler("cuda")`` on a CPU) or while
flatmin warns about a forgotten call fails. ``>>>`` blocks run as doctests (their output
is compared). Only the names a set-up declares reach a block, so a block that forgets
``import torch.nn.functional as F`` still fails. Shell lines run in one shared temporary
directory in README order; ``flatmin CMD`` lines get REDUCE's arguments appended
(argparse keeps the last value), so ``--epochs 20`` trains one epoch on a small subset.
"""

from __future__ import annotations

import ast
import doctest
import gzip
import os
import re
import shlex
import struct
import subprocess
import sys
import textwrap
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


# ---- set-ups: what a block may assume its reader already has ---------------------------
# Each set-up is source code plus the names it hands to the block; nothing else is passed
# on. These are the "hidden fixtures" the README's markers name; they are kept to what a
# reader of the block would have in their own script.
_MODEL = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10),
)
x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
loss_fn = torch.nn.functional.cross_entropy
train_set = torch.utils.data.TensorDataset(torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,)))
loader = torch.utils.data.DataLoader(train_set, batch_size=16)
epochs = 7  # SAF and MESA start after epoch 5: the term is really computed
"""
_MODEL_NAMES = ("model", "x", "y", "loss_fn", "train_set", "loader", "epochs")

_DDP = """
import torch
torch.manual_seed(0)  # the same initial weights on every process
model = torch.nn.Sequential(
    torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
)
train_set = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 10, (64,)))
loader = torch.utils.data.DataLoader(
    train_set, batch_size=8, sampler=torch.utils.data.distributed.DistributedSampler(train_set)
)
epochs = 7
"""

_LAYERS = """
import torch
torch.manual_seed(0)

class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 10)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))

model = Layers()
x, y = torch.randn(8, 8), torch.randint(0, 10, (8,))
"""

SETUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    # a small BatchNorm CNN for 10 classes, one batch (x, y), a dataset and its loader
    "model": (_MODEL, _MODEL_NAMES),
    # the same, with the SAM-family names a docstring example takes for granted
    "sam": (
        _MODEL
        + """
import torch.nn.functional as F
from flatmin import SAM
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
def closure():
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss
""",
        (*_MODEL_NAMES, "torch", "F", "SAM", "opt", "closure"),
    ),
    # the same, with a plain SGD optimizer (loops with SAF, MESA, an EMA)
    "sgd": (
        _MODEL
        + """
import torch.nn.functional as F
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
""",
        (*_MODEL_NAMES, "opt"),
    ),
    # a process of a gloo group (run with processes=2): a model and a DistributedSampler's
    # loader, as a torchrun script would have them
    "ddp": (
        _DDP,
        ("model", "train_set", "loader"),
    ),
    # the same model wrapped in DDP, with a SAM optimizer, this process's batch, a loss
    "ddp_model": (
        _DDP
        + """
from torch.nn.parallel import DistributedDataParallel
from flatmin import SAM
ddp_model = DistributedDataParallel(model)
opt = SAM(ddp_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
x, y = next(iter(loader))
loss_fn = torch.nn.functional.cross_entropy
""",
        ("model", "train_set", "loader", "ddp_model", "opt", "x", "y", "loss_fn", "epochs"),
    ),
    # a process of a gloo group with a model made of .layers, seeded alike on every rank
    # (FSDP2 does not broadcast initial weights), and a batch
    "fsdp": (_LAYERS, ("model", "x", "y")),
    # a network class made of .blocks, each process seeded alike (FSDP2 examples build it)
    "fsdp_net": (
        """
import torch
torch.manual_seed(0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), torch.nn.Linear(16, 10)]
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
""",
        ("Net",),
    ),
    # the same model sharded with FSDP2, a SAM optimizer over its shards and a SAF
    "fsdp_sam": (
        _LAYERS
        + """
from torch.distributed.fsdp import fully_shard
from flatmin import SAF, SAM
for layer in model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
saf = SAF(num_samples=64, num_classes=10)
""",
        ("model", "x", "y", "optimizer", "saf"),
    ),
}

# ---- shell commands: the reduced form of each README command -----------------------------
REDUCE: dict[tuple[str, ...], list[str]] = {
    ("train",): ["--epochs", "1", "--subset", "128", "--batch-size", "64", "--no-progress"],
    ("measure",): [
        "--max-batches", "1", "--batch-size", "64", "--top-k", "1", "--max-iter", "4",
        "--trace-queries", "6", "--steps", "3", "--noise-repeats", "1",
    ],
    ("bench", "speed"): [
        "--steps", "2", "--repeats", "1", "--batch-size", "32", "--models", "cnn1d",
        "--methods", "sgd", "sam",
    ],
    ("bench", "accuracy"): ["--epochs", "1", "--seeds", "1"],
}  # fmt: skip


def shell_commands(block: Block) -> list[tuple[int, list[str]]]:
    """``(line number, argv)`` of each command of a shell block, comments stripped and
    lines ending in a backslash joined to the next."""
    commands, pending, start = [], "", 0
    for offset, line in enumerate(block.code.splitlines()):
        line = line.split(" #", 1)[0].strip()
        if not pending:
            start = offset
        if line.endswith("\\"):  # continued on the next line
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line and not line.startswith("#"):
            commands.append((block.line + start, shlex.split(line)))
    return commands


def flatmin_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``flatmin`` (or ``-m flatmin.cli`` under torchrun), else None."""
    if argv[0] == "flatmin":
        return argv[1:]
    if argv[0] == "torchrun" and "flatmin.cli" in argv:
        return argv[argv.index("flatmin.cli") + 1 :]
    return None


def reduced(argv: list[str], fashion_mnist: Path) -> list[str]:
    """The command with the reduction of its ``flatmin`` subcommand appended, and
    ``--data-dir fashion_mnist`` where it trains on Fashion-MNIST without one."""
    args = flatmin_arguments(argv)
    if args is None or "--help" in args:
        return argv
    extra = next((REDUCE[k] for k in ((*args[:2],), (*args[:1],)) if k in REDUCE), [])
    if "fashion-mnist" in args and "--data-dir" not in args:
        extra = [*extra, "--data-dir", str(fashion_mnist)]
    return [*argv, *extra]


def write_fake_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 64) -> Path:
    """IDX files with Fashion-MNIST's names and magic numbers and random pixels, so that
    the README's ``--dataset fashion-mnist`` commands run without the real data."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        )
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 0x801, n) + labels.tobytes())
        )
    return root


# ---- running python blocks ---------------------------------------------------------------


def namespace_for(
    block: Block, previous: dict | None, named: dict[str, dict], base: dict | None = None
) -> dict:
    """The globals a python block runs in: the previous block's, a copy of a named one's,
    or a fresh one with its set-up's names (and ``base``, e.g. a module's public names)."""
    source = block.options.get("continue")
    if source == "yes":
        if previous is None:
            raise RuntimeError(f"{block.id}: 'continue', but the block before it did not run")
        return previous
    if source:
        if source not in named:
            raise RuntimeError(f"{block.id}: 'continue={source}', but no block named so ran")
        return dict(named[source])
    namespace: dict = {"__name__": "__example__", **(base or {})}
    setup = block.options.get("setup")
    if setup:
        code, exported = SETUPS[setup]
        scratch: dict = {"__name__": "__setup__"}
        exec(compile(code, f"<setup {setup}>", "exec"), scratch)
        namespace.update({name: scratch[name] for name in exported})
    return namespace


def run_python(block: Block, namespace: dict) -> dict:
    """Execute the block in ``namespace`` with every warning an error (``>>>`` blocks run
    as doctests), then its marker's ``check``. Tracebacks name the file's own lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pattern in filter(None, block.options.get("ignore", "").split(";")):
            warnings.filterwarnings("ignore", message=pattern)  # a framework's own notices
        if block.is_doctest:
            _run_doctest(block, namespace)
        else:
            code = "\n" * (block.line - 1) + block.code
            exec(compile(code, str(block.path), "exec"), namespace)
        check = block.options.get("check")  # a visible condition on what the block left
        if check and not eval(check, namespace):
            raise AssertionError(f"{block.id}: after the block, {check} is false")
    return namespace


def _run_doctest(block: Block, namespace: dict) -> None:
    test = doctest.DocTestParser().get_doctest(
        block.code, namespace, block.owner or block.id, str(block.path), block.line - 1
    )
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    if runner.failures:
        raise AssertionError(f"doctest {block.id} failed:\n" + "".join(report))


def run_script(block: Block, directory: Path) -> None:
    """Run the block as ``python example.py`` in ``directory`` (warnings are errors)."""
    script = directory / "example.py"
    script.write_text(block.code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=directory, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"{block.id} as a script:\n{done.stdout}\n{done.stderr}")


def run_blocks_in_processes(rank: int, world_size: int, blocks: list[Block], out: str) -> None:
    """Worker for ``processes=N`` blocks (flatmin.distributed.spawn; module level, so it
    pickles): run each block in order, record ``<i>.ok``, or its traceback in ``<i>.err``
    and stop (the other process then fails at its next collective, and spawn ends both)."""
    import torch

    os.chdir(out)  # what the blocks write (checkpoints) goes there
    for i, block in enumerate(blocks):
        torch.manual_seed(0)
        try:
            run_python(block, namespace_for(block, None, {}, example_globals(block)))
        except BaseException:
            Path(out, f"{i}.err").write_text(f"rank {rank}: {traceback.format_exc()}")
            raise
        if rank == 0:
            Path(out, f"{i}.ok").touch()


def example_globals(block: Block) -> dict:
    """What a docstring example may use without importing it, as in torch's own docstrings:
    ``torch``, ``nn``, ``F``, flatmin's top-level names, :mod:`flatmin.optim`'s (the SAM
    family and the BatchNorm helpers) and the public names of the module the example
    documents. README blocks get nothing: a reader copies them as they are."""
    if not block.owner:
        return {}
    import importlib

    import torch
    import torch.nn.functional as F
    from torch import nn

    import flatmin.optim

    names = {"torch": torch, "nn": nn, "F": F}
    names.update({name: getattr(flatmin, name) for name in flatmin.__all__})
    names.update({name: getattr(flatmin.optim, name) for name in flatmin.optim.__all__})
    module_name = block.owner
    while True:
        try:
            module = importlib.import_module(module_name)
            break
        except ModuleNotFoundError:
            module_name = module_name.rpartition(".")[0]  # a class or function: its module
    public = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
    names.update({name: getattr(module, name) for name in public})
    return names
