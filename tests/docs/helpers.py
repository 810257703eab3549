"""Executed documentation: how the code blocks of tests/docs/blocks.py run.

**Running.** Python blocks run with every warning an error, so a snippet that "works"
while torch silently disables something (``GradScaler("cuda")`` on a CPU) or while
flatmin warns about a forgotten call fails. ``>>>`` blocks run as doctests (their output
is compared). Only the names a set-up declares reach a block, so a block that forgets
``import torch.nn.functional as F`` still fails. Shell lines run in one shared temporary
directory in README order; ``flatmin CMD`` lines get REDUCE's arguments appended
(argparse keeps the last value), so ``--epochs 20`` trains one epoch on a small subset.
"""

from __future__ import annotations

import doctest
import os
import shlex
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

from tests.docs.blocks import ROOT, SRC, Block

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
