import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatmin.cli import build_parser, main
from flatmin.distributed.launch import free_port
from flatmin.train.checkpoint import load_run
from flatmin.train.registry import METHODS
from tests.cli.helpers import TINY, flatmin, train_tiny
from tests.helpers import (
    assert_one_line_error,
    assert_runs_equal,
    assert_trees_equal,
)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_trains_end_to_end(tmp_path, capsys, method):
    extra = ["--start-epoch", "0"] if method in ("saf", "mesa") else []
    assert train_tiny(tmp_path, "--method", method, "--epochs", "2", *extra) == 0
    out = capsys.readouterr().out
    assert f"{method}: test accuracy" in out and "epoch 2/2" in out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == method
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["method"] == method


def test_flags_reach_the_configuration(tmp_path):
    args = ["--method", "saf", "--epochs", "1", "--lam", "0.5", "--lag-epochs", "2",
            "--label-smoothing", "0.1", "--schedule", "step", "--no-nesterov"]  # fmt: skip
    assert train_tiny(tmp_path, *args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["lam"], config["lag_epochs"], config["tau"]) == (0.5, 2, 5.0)
    assert (config["label_smoothing"], config["schedule"], config["nesterov"]) == (
        0.1,
        "step",
        False,
    )


def test_top_k_trains_a_compressed_store_that_resumes_bit_exactly(tmp_path):
    args = ["--method", "saf", "--top-k", "3", "--epochs", "3", "--start-epoch", "0",
            "--lag-epochs", "1"]  # fmt: skip
    assert train_tiny(tmp_path, *args, out="straight") == 0
    assert train_tiny(tmp_path, *args, "--stop-after", "2") == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    straight = tmp_path / "straight" / "checkpoint.pt"
    assert_runs_equal(straight, tmp_path / "run" / "checkpoint.pt")
    saf = torch.load(straight, weights_only=True)["method_state"]["saf"]
    assert saf["top_k"] == 3 and set(saf["store"]) == {"rows", "written_epoch"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["top_k"] == 3


def test_a_top_k_above_the_datasets_classes_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert train_tiny(tmp_path, "--method", "saf", "--top-k", "11") == 2
    assert_one_line_error(capsys.readouterr().err, "--top-k", "10 classes, got 11")
    assert not any((tmp_path / "run").iterdir())


def test_help_shows_each_methods_default(capsys):
    parser, _ = build_parser(["train"])
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ρ of the perturbation (default: 0.05; asam 0.5)" in text  # --rho
    assert "KL term (default: 0.3; mesa 0.8)" in text  # --lam
    assert "peak learning rate (default: 0.1; adamw 0.001)" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "lion"], ["unknown method 'lion'", *METHODS]),
        (["--model", "vgg"], ["unknown model 'vgg'", "mlp", "cnn1d", "resnet18", "wrn28_10"]),
        (["--dataset", "svhn"], ["unknown dataset 'svhn'", "mnist1d", "fashion-mnist", "cifar10"]),
        (["--method", "sgd", "--rho", "0.1"], ["--rho does not apply to method 'sgd'"]),
        (["--method", "sam", "--rho", "-1"], ["--rho must be a finite number >= 0.0, got -1.0"]),
        (
            ["--schedule", "step", "--step-gamma", "-1"],
            ["step_gamma must be a finite number > 0.0"],
        ),
        (["--step-gamma", "0"], ["step_gamma must be a finite number > 0.0"]),
        (["--step-gamma", "nan"], ["step_gamma must be a finite number > 0.0"]),
        (["--sharpness-rho", "-0.1"], ["sharpness_rho must be a finite number > 0.0"]),
        (["--label-smoothing", "inf"], ["label_smoothing must be a finite number >= 0.0"]),
        (["--num-workers", "-1"], ["num_workers must be an integer >= 0, got -1"]),
        (["--warmup-epochs", "5", "--epochs", "5"], ["warmup_epochs must be an integer >= 0"]),
        (["--step-milestones", "0.5", "1.5"], ["step_milestones must be a finite number > 0.0"]),
        (["--threads", "0"], ["threads must be an integer >= 1, got 0"]),
        (["--method", "saf", "--top-k", "-1"], ["--top-k must be an integer >= 0, got -1"]),
        (["--method", "sam", "--top-k", "3"], ["--top-k does not apply to method 'sam'"]),
    ],
)
def test_bad_names_and_values_are_explained(tmp_path, capsys, args, expected):
    assert train_tiny(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, *expected)
    assert not (tmp_path / "run").exists()


def test_missing_data_directory_says_what_was_expected(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(empty),
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "t10k-labels-idx1-ubyte.gz" in err


def test_a_diverging_run_exits_1_and_says_what_it_kept(tmp_path, capsys):
    assert train_tiny(tmp_path, "--epochs", "3", "--lr", "1e30") == 1
    err = capsys.readouterr().err
    assert "sgd diverged: the weights are not finite after epoch 1" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    (record,) = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert record["diverged"] is True and record["epoch"] == 1


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_leaves_a_loadable_run(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "flatmin.cli", "train", *TINY, "--subset", "400",
               "--epochs", "500", "--threads", "1", "--out", str(run)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 2
    ):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert state["epoch"] == len(records) == records[-1]["epoch"] >= 2
    assert state["metrics"] == records


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_runs_the_same_training_as_nproc(tmp_path):
    """`flatmin train --nproc 2` and `torchrun --nproc-per-node 2 -m flatmin.cli train`
    (which the command detects from torchrun's WORLD_SIZE) train the same weights."""
    common = ["--method", "sam", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
              "--subset", "256", "--quiet"]  # fmt: skip
    assert main(["train", *common, "--nproc", "2", "--out", str(tmp_path / "nproc")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "flatmin.cli", "train", *common,
               "--out", str(tmp_path / "torchrun")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("sam: test accuracy") == 1  # printed by rank 0 only
    nproc = torch.load(tmp_path / "nproc" / "checkpoint.pt", weights_only=True)
    torchrun = torch.load(tmp_path / "torchrun" / "checkpoint.pt", weights_only=True)
    assert nproc["world_size"] == torchrun["world_size"] == 2
    assert_trees_equal(nproc["model"], torchrun["model"])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_train_as_nproc_2_with_fsdp(tmp_path):
    """Two `torchrun --nnodes 2 --nproc-per-node 1` "nodes" on one machine (c10d
    rendezvous on 127.0.0.1) run `flatmin train --fsdp` as one group of 2: the workers'
    run files hold the weights `--nproc 2 --fsdp` trains, and rank 0 alone reports."""
    common = ["--method", "sam", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
              "--subset", "256", "--quiet", "--fsdp", "--threads", "1"]  # fmt: skip
    assert main(["train", *common, "--nproc", "2", "--out", str(tmp_path / "nproc")]) == 0
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}", "--rdzv-id", "flatmin-test", "-m", "flatmin.cli",
            "train", *common, "--out", str(tmp_path / "nodes")]  # fmt: skip
    nodes = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [process.communicate(timeout=600) for process in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    assert sum(out.count("sam: test accuracy") for out, _ in outputs) == 1  # rank 0's
    runs = {}
    for name in ("nproc", "nodes"):
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert state["world_size"] == 2
        runs[name] = load_run(tmp_path / name).model.state_dict()
    assert_trees_equal(runs["nproc"], runs["nodes"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fsdp"], "--fsdp shards the model across processes: give --nproc N with N >= 2"),
        (["--fsdp", "--nproc", "1"], "--fsdp shards the model across processes"),
        (["--fsdp", "--nproc", "2", "--track-sharpness"],
         "--track-sharpness measures a whole model, which no process holds under --fsdp"),
    ],
)  # fmt: skip
def test_fsdp_settings_it_cannot_run_are_refused_before_anything_is_written(
    tmp_path, capsys, flags, message
):
    assert train_tiny(tmp_path, "--method", "sam", "--epochs", "1", *flags) == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


def test_nproc_must_be_positive(tmp_path, capsys):
    code = main(["train", "--method", "sgd", "--dataset", "digits", "--nproc", "0",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "--nproc must be a positive" in capsys.readouterr().err


# --- the run directory ----------------------------------------------------------------


@pytest.mark.distributed
def test_an_error_inside_a_worker_process_is_one_line(tmp_path):
    # A real process: torch's own messages while it stops the other worker (its logger's
    # "Terminating process … via signal SIGTERM") reach the terminal too.
    empty = tmp_path / "empty"
    empty.mkdir()
    done = flatmin(["train", "--dataset", "fashion-mnist", "--data-dir", str(empty),
                    "--nproc", "2", "--out", str(tmp_path / "run")])  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, "flatmin train: error: Fashion-MNIST not found",
                          "train-images-idx3-ubyte.gz")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "hidden", "extra"),
    [
        (["train", *TINY, "--epochs", "1"], ["tqdm"], "flatmin[train]"),
        (["train", "--dataset", "mnist1d", "--epochs", "1"], ["mnist1d"], "flatmin[train]"),
        (["plot", "RUN"], ["matplotlib"], "flatmin[plot]"),
        (["measure", "RUN", "--sharpness", "--max-batches", "1"], ["tqdm"], "flatmin[train]"),
    ],
)
def test_a_missing_extra_is_named_with_its_install_command(tmp_path, args, hidden, extra):
    run = tmp_path / "run"
    assert train_tiny(tmp_path, "--epochs", "1", "--quiet") == 0
    cache = ["--data-dir", str(tmp_path / "cache")] if "mnist1d" in args else []
    args = [str(run) if a == "RUN" else a for a in args]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "new"), *cache]
    elif args[0] == "measure":
        args += ["--out", str(tmp_path / "m")]
    done = flatmin(args, hidden=hidden)
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, f"optional package {hidden[0]!r}", f"pip install '{extra}'")


def _spawned_children(pid: int) -> list[int]:
    """The worker processes (multiprocessing ``spawn_main``) started by ``pid``."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in _read(f"/proc/{c}/cmdline")]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_workers_stop_when_their_parent_is_killed(tmp_path):
    """A backgrounded `--nproc 2` run (SIGINT ignored) whose parent gets SIGKILL: the
    two training processes notice and stop instead of training on alone."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "flatmin.cli", "train", *TINY, "--subset", "400",
               "--epochs", "1000", "--nproc", "2", "--quiet", "--out", str(out)]  # fmt: skip

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=ignore_sigint)  # fmt: skip
    workers: list[int] = []
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text()):
            time.sleep(0.1)
        workers = _spawned_children(parent.pid)
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        parent.kill()
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
