"""``flatmin measure CHECKPOINT``: sharpness diagnostics of a trained model.

Example:

.. code-block:: bash

    flatmin measure runs/sam/checkpoint.pt --sharpness --hessian --trace --landscape 2d \\
        --noise --out runs/sam/measure

rebuilds the model and its dataset from the checkpoint (a ``flatmin train`` checkpoint or
run directory, ``flatmin.train.checkpoint.load_run``: the same split, noise and
subset as training), measures on the first ``--max-batches`` batches of the chosen
split, and writes ``summary.json`` (every number, with the samples, seeds and iterations
it used) and the PNGs of the landscape and noise curve into ``--out``.

The loss is the plain cross-entropy (no label smoothing or weight decay), in eval
mode unless ``--train-mode-bn``. Every option is checked (``--out`` first of all), and
the checkpoint loaded, before anything is measured or written: a bad value, an unusable
``--out``, an unavailable device, figures asked for without the ``flatmin[plot]`` extra or
an unreadable, corrupted or foreign checkpoint ends the command with one line and exit
status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from flatmin.cli._out import check_out
from flatmin.measure import (
    gaussian_noise_curve,
    hessian_eigenvalues,
    hessian_trace,
    loss_landscape,
    plots,
    sam_sharpness,
)
from flatmin.measure.noise import DEFAULT_SCALES
from flatmin.optim._checks import check_int, check_real
from flatmin.train.checkpoint import LoadedRun, load_run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument(
        "checkpoint", type=Path, metavar="CHECKPOINT", help="checkpoint.pt or its run directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for summary and PNGs")
    what = parser.add_argument_group("what to measure (at least one)")
    what.add_argument("--sharpness", action="store_true", help="SAM sharpness L(w+ε) − L(w)")
    what.add_argument("--hessian", action="store_true", help="top Hessian eigenvalues (Lanczos)")
    what.add_argument("--trace", action="store_true", help="Hessian trace (Hutch++)")
    what.add_argument("--landscape", choices=("1d", "2d"), help="loss landscape")
    what.add_argument("--noise", action="store_true", help="loss under Gaussian weight noise")
    data = parser.add_argument_group("data")
    data.add_argument("--split", choices=("train", "test"), default="train")
    data.add_argument("--data-dir", help="override the checkpoint's data_dir")
    data.add_argument("--batch-size", type=int, default=256)
    data.add_argument(
        "--max-batches", type=int, default=8, help="batches to average over (0: all; default 8)"
    )
    data.add_argument("--device", default="cpu")
    data.add_argument(
        "--train-mode-bn", action="store_true", help="BatchNorm with batch statistics"
    )
    options = parser.add_argument_group("options")
    options.add_argument("--seed", type=int, default=0, help="seed of every random estimate")
    options.add_argument("--rho", type=float, default=0.05, help="sharpness radius ρ")
    options.add_argument("--m", type=int, help="m-sharpness sub-batch size")
    options.add_argument("--ascent-steps", type=int, default=1, help="sharpness ascent steps")
    options.add_argument("--top-k", type=int, default=1, help="Hessian eigenvalues to find")
    options.add_argument("--max-iter", type=int, default=100, help="Lanczos iterations at most")
    options.add_argument("--tol", type=float, default=1e-4, help="Lanczos relative residual")
    options.add_argument("--trace-queries", type=int, default=99, help="Hutch++ products")
    options.add_argument("--steps", type=int, default=21, help="landscape points per axis")
    options.add_argument("--span", type=float, default=1.0, help="landscape half-width")
    options.add_argument(
        "--noise-scales",
        type=lambda text: [float(s) for s in text.split(",")],
        default=list(DEFAULT_SCALES),
        help="comma-separated noise scales (default %(default)s)",
    )
    options.add_argument("--noise-repeats", type=int, default=5)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _progress(description: str) -> Callable[[Iterable], Iterable]:
    from tqdm.auto import tqdm  # optional: the flatmin[train] extra

    return functools.partial(
        tqdm, desc=description, leave=False, disable=not sys.stderr.isatty(), file=sys.stderr
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse an unusable ``--out``, a bad option value or an unusable device
    (``ValueError``, one line); ``ModuleNotFoundError`` when ``--landscape`` or ``--noise``
    asks for figures and matplotlib (the ``flatmin[plot]`` extra) is not installed."""
    if args.landscape or args.noise:
        import matplotlib  # noqa: F401 - optional (flatmin[plot]); its absence is named by main()
    check_out(args.out)
    check_real("--rho", args.rho, minimum=0.0)
    check_real("--tol", args.tol, minimum=0.0, exclusive_minimum=True)
    check_real("--span", args.span, minimum=0.0, exclusive_minimum=True)
    for scale in args.noise_scales:
        check_real("--noise-scales", scale, minimum=0.0)
    for name, minimum in (("batch_size", 1), ("max_batches", 0), ("ascent_steps", 1),
                          ("top_k", 1), ("max_iter", 1), ("trace_queries", 1), ("steps", 2),
                          ("noise_repeats", 1)):  # fmt: skip
        check_int("--" + name.replace("_", "-"), getattr(args, name), minimum=minimum)
    if args.m is not None:
        check_int("--m", args.m, minimum=1)
    check_device(args.device)


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if a tensor can be put there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unavailable"
        raise ValueError(f"--device {name} cannot be used: {reason}") from None
    return device


def measure(args: argparse.Namespace, run: LoadedRun) -> dict[str, Any]:
    """Run the asked measurements on ``run``; write the PNGs; return the summary."""
    model, config = run.model.to(args.device), run.checkpoint["config"]
    dataset = getattr(run.data, args.split)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    common = {
        "max_batches": args.max_batches or None,
        "train_mode_bn": args.train_mode_bn,
    }
    loss_fn = F.cross_entropy
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "config": config,
        "split": args.split,
        "batch_size": args.batch_size,
        **common,
        "plots": [],
    }

    def on_data(measurement: Callable[..., Any], label: str, **options: Any) -> Any:
        """Run ``measurement`` on the model and loader with the shared options."""
        return measurement(model, loss_fn, loader, progress=_progress(label), **options, **common)

    if args.sharpness:
        summary["sharpness"] = on_data(
            sam_sharpness, "sharpness", rho=args.rho, m=args.m, steps=args.ascent_steps
        )
    if args.hessian:
        summary["hessian"] = on_data(
            hessian_eigenvalues,
            "lanczos",
            k=args.top_k,
            max_iter=args.max_iter,
            tol=args.tol,
            seed=args.seed,
        )
    if args.trace:
        summary["trace"] = on_data(
            hessian_trace, "trace", num_queries=args.trace_queries, seed=args.seed
        )
    if args.landscape:
        result = on_data(
            loss_landscape,
            f"landscape {args.landscape}",
            dims=int(args.landscape[0]),
            steps=args.steps,
            span=args.span,
            seed=args.seed,
        )
        summary["landscape"] = result
        if result.dims == 1:
            paths = [plots.plot_landscape_curve(result, out / "landscape_1d.png")]
        else:
            paths = [
                plots.plot_landscape_contour(result, out / "landscape_contour.png"),
                plots.plot_landscape_surface(result, out / "landscape_surface.png"),
            ]
        summary["plots"] += [p.name for p in paths]
    if args.noise:
        result = on_data(
            gaussian_noise_curve,
            "noise",
            scales=args.noise_scales,
            repeats=args.noise_repeats,
            seed=args.seed,
        )
        summary["noise"] = result
        summary["plots"].append(plots.plot_noise_curve(result, out / "noise.png").name)
    summary = _jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(args: argparse.Namespace) -> int:
    if not (args.sharpness or args.hessian or args.trace or args.landscape or args.noise):
        print(
            "flatmin measure: error: choose at least one of --sharpness, --hessian, --trace, "
            "--landscape {1d,2d}, --noise",
            file=sys.stderr,
        )
        return 2
    try:
        check_arguments(args)
        run = load_run(args.checkpoint, data_dir=args.data_dir)
        summary = measure(args, run)
    except (FileNotFoundError, ValueError) as error:
        print(f"flatmin measure: error: {error}", file=sys.stderr)
        return 2
    for key in ("sharpness", "hessian", "trace"):
        if key in summary:
            print(f"{key}: {_headline(summary[key])}")
    print(f"wrote {args.out / 'summary.json'}" + "".join(f", {p}" for p in summary["plots"]))
    return 0


def _headline(result: dict[str, Any]) -> str:
    if "values" in result:
        state = "converged" if result["converged"] else "NOT converged"
        return f"{result['values']} ({state}, {result['iterations']} products)"
    if "stderr" in result:
        return f"{result['value']:.6g} ± {result['stderr']:.2g}"
    return f"{result['value']:.6g} (loss {result['loss']:.6g})"
