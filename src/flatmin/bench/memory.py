"""Peak resident memory of one method's training, measured in a process of its own.

A CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``, so the
measurement is the operating system's. A fresh Python process builds the model and runs
one forward/backward of a throwaway copy (lazily initialised kernels and thread pools,
~100 MB for a small CNN, go into the baseline); then it resets its resident high-water
mark, creates the method through the registry, fills what the method keeps between
steps (SAF's store for ``lag_epochs`` epochs) and trains ``blocks`` epochs of the speed
benchmark's synthetic data. The figure is how far the resident peak rose. A method's
*peak extra memory* is its figure minus SGD's: its persistent state (a copy of ``w``, a
teacher, a logit store) plus what its step holds beyond SGD's step, including memory the
allocator keeps from the first pass instead of reusing it in the second.

The figure includes what the allocator keeps rather than hands back, so repeated
measurements differ (``benchmarks/RESULTS.md`` says by how much). SAF's float16 store is allocated zeroed, and only the rows written become
resident, so on the synthetic set (``steps × batch`` samples) the measured figure is the
part in use, the counted one the full store. ``flatmin bench speed --measure-memory``
prints it next to the extra memory counted from tensor sizes.

    python -m flatmin.bench.memory '{"name": "cnn-28x28", ...}' mesa   # prints bytes
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
from dataclasses import asdict

import torch
from torch import nn

from flatmin.bench.workload import MethodRunner, SpeedCase
from flatmin.train.models import build_model


def peak_rss_bytes(case: SpeedCase, method: str, blocks: int = 2, repeats: int = 1) -> int:
    """How far a fresh process's resident peak rises while it trains ``method`` on
    ``case`` for ``blocks`` epochs (two: MESA's term, like the speed benchmark's, is on from
    the second epoch), counted from the moment its model is built and warmed up; the
    median over ``repeats`` processes."""
    peaks = []
    for _ in range(repeats):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "flatmin.bench.memory",
                json.dumps(asdict(case)),
                method,
                str(blocks),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"measuring the memory of {method!r} on {case.name} failed:\n{done.stderr[-2000:]}"
            )
        peaks.append(int(done.stdout.split()[-1]))
    return int(statistics.median(peaks))


def _child(case_json: str, method: str, blocks: int) -> int:
    """Bytes by which training ``method`` raised this process's resident peak above its
    resident size once the model was built (Linux: ``VmHWM`` reset through
    ``/proc/self/clear_refs``; elsewhere the whole process's ``ru_maxrss``)."""
    torch.set_num_threads(1)
    fields = json.loads(case_json)
    fields["input_shape"] = tuple(fields["input_shape"])
    case = SpeedCase(**fields)
    torch.manual_seed(0)
    base = build_model(case.model, case.num_classes, case.input_shape)
    _warm_up(base, case)
    baseline = _reset_peak()
    runner = MethodRunner(case, method, base)
    for _ in range(blocks):
        runner.block()
    return _peak() - baseline


def _warm_up(model: nn.Module, case: SpeedCase) -> None:
    """One forward/backward of a throwaway copy at the case's batch size, so that lazily
    initialised kernels, thread pools and allocator arenas (~200 MB for a small CNN) are
    in the baseline and not in any method's figure."""
    warm = copy.deepcopy(model).train()
    x = torch.randn((case.batch_size, *case.input_shape))
    torch.nn.functional.cross_entropy(
        warm(x), torch.zeros(case.batch_size, dtype=torch.long)
    ).backward()


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> int:
    """Reset the resident high-water mark where the kernel allows it; return the
    resident size it now starts from (0 where the peak cannot be reset)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return 0
    return _status_bytes("VmHWM") or 0


def _peak() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # POSIX only; Linux has VmHWM above

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, else KiB


if __name__ == "__main__":
    print(_child(sys.argv[1], sys.argv[2], int(sys.argv[3])))
