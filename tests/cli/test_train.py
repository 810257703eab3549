import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from flatmin.cli import build_parser, main
from flatmin.distributed.launch import free_port
from flatmin.train.checkpoint import load_run, save_checkpoint
from flatmin.train.lock import RunLock
from flatmin.train.models import build_model
from flatmin.train.registry import METHODS
from tests.cli.helpers import TINY, flatmin, uncreatable
from tests.helpers import (
    assert_one_line_error,
    assert_runs_equal,
    assert_trees_equal,
    flip_a_stored_byte,
    truncate,
    umask,
    write_cifar10,
)


def _train(tmp_path, *args, out="run"):
    return main(["train", *TINY, "--out", str(tmp_path / out), *args])


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_trains_end_to_end(tmp_path, capsys, method):
    extra = ["--start-epoch", "0"] if method in ("saf", "mesa") else []
    assert _train(tmp_path, "--method", method, "--epochs", "2", *extra) == 0
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
    assert _train(tmp_path, *args) == 0
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
    assert _train(tmp_path, *args, out="straight") == 0
    assert _train(tmp_path, *args, "--stop-after", "2") == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    straight = tmp_path / "straight" / "checkpoint.pt"
    assert_runs_equal(straight, tmp_path / "run" / "checkpoint.pt")
    saf = torch.load(straight, weights_only=True)["method_state"]["saf"]
    assert saf["top_k"] == 3 and set(saf["store"]) == {"rows", "written_epoch"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["top_k"] == 3


def test_a_top_k_above_the_datasets_classes_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert _train(tmp_path, "--method", "saf", "--top-k", "11") == 2
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
    assert _train(tmp_path, *args) == 2
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
    assert _train(tmp_path, "--epochs", "3", "--lr", "1e30") == 1
    err = capsys.readouterr().err
    assert "sgd diverged: the weights are not finite after epoch 1" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    (record,) = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert record["diverged"] is True and record["epoch"] == 1


def test_stop_after_then_resume_equals_a_straight_run(tmp_path):
    assert _train(tmp_path, "--method", "sam", "--epochs", "3", out="straight") == 0
    assert _train(tmp_path, "--method", "sam", "--epochs", "3", "--stop-after", "1") == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (["--method", "sam"], "trained with method 'sgd', not 'sam'"),
        (["--model", "cnn"], "trained with model 'mlp', not 'cnn'"),
        (["--dataset", "mnist1d"], "trained with dataset 'digits', not 'mnist1d'"),
        (["--epochs", "5"], "epochs 2 → 5"),
    ],
)
def test_incompatible_resume_refuses_and_says_why(tmp_path, capsys, change, reason):
    assert _train(tmp_path, "--epochs", "2", "--stop-after", "1") == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", *change]) == 2
    assert reason in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_resume_without_a_run_says_so(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no run to continue" in capsys.readouterr().err


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
    assert _train(tmp_path, "--method", "sam", "--epochs", "1", *flags) == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


def test_nproc_must_be_positive(tmp_path, capsys):
    code = main(["train", "--method", "sgd", "--dataset", "digits", "--nproc", "0",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "--nproc must be a positive" in capsys.readouterr().err


# --- the run directory ----------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_started_together_on_one_directory_do_not_mix(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--subset", "400", "--epochs", "30", "--threads", "1", "--quiet",
            "--out", str(out)]  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: flatmin(args), range(2)))
    assert sorted(d.returncode for d in done) == [0, 2], [d.stderr for d in done]
    loser = next(d for d in done if d.returncode == 2)
    assert_one_line_error(loser.stderr, f"{out} is in use by another flatmin process")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 31))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 30 and state["metrics"] == records
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_run_directory_in_use_is_refused_at_once(tmp_path, capsys, nproc):
    with RunLock(tmp_path / "run"):  # another run holds it
        assert _train(tmp_path, "--epochs", "1", "--nproc", nproc) == 2
    assert_one_line_error(capsys.readouterr().err, "is in use by another flatmin process")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("my notes\n")
    assert _train(tmp_path, "--epochs", "1") == 2
    assert_one_line_error(capsys.readouterr().err, "--out", "is a file, not a directory")
    assert (tmp_path / "run").read_text() == "my notes\n"


def test_an_out_that_cannot_be_created_is_refused(tmp_path, capsys):
    out = uncreatable(tmp_path)
    assert main(["train", *TINY, "--epochs", "1", "--out", out]) == 2
    assert_one_line_error(capsys.readouterr().err, f"--out {out} cannot be created")


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_run_files_get_the_mode_open_gives(tmp_path, mask):
    with umask(mask) as mode:
        assert _train(tmp_path, "--epochs", "1", "--quiet") == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == mode, name


# --- resuming -------------------------------------------------------------------------


def test_resume_with_data_loader_workers_is_bit_exact(tmp_path):
    args = ["--method", "sam", "--epochs", "3", "--num-workers", "1", "--quiet"]
    assert _train(tmp_path, *args, out="straight") == 0
    assert _train(tmp_path, *args, "--stop-after", "1") == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    assert_runs_equal(tmp_path / "straight" / "checkpoint.pt",
                               tmp_path / "run" / "checkpoint.pt")  # fmt: skip


def test_resume_with_workers_that_augment_is_bit_exact(tmp_path):
    # CIFAR training items are randomly cropped and flipped inside the worker process,
    # from the worker's own torch generator: a resumed epoch must draw the same crops.
    write_cifar10(tmp_path / "cifar", per_batch=16, num_test=8)
    args = ["--method", "sam", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"),
            "--model", "mlp", "--batch-size", "16", "--augment", "--num-workers", "1",
            "--epochs", "3", "--quiet"]  # fmt: skip
    assert main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    assert main(["train", *args, "--stop-after", "1", "--out", str(tmp_path / "run")]) == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 0
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert straight["config"]["augment"] and straight["config"]["num_workers"] == 1
    assert_runs_equal(straight, tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_a_stored_byte, "is corrupted: its contents do not match the checksum"),
        (truncate, "cannot be read as a checkpoint"),
        (lambda p: p.write_bytes(b"PK\x03\x04 not really"), "cannot be read as a checkpoint"),
    ],
)
def test_resume_refuses_a_damaged_checkpoint_in_one_line(tmp_path, capsys, damage, message):
    assert _train(tmp_path, "--epochs", "2", "--stop-after", "1", "--quiet") == 0
    damage(tmp_path / "run" / "checkpoint.pt")
    damaged = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin train: error:", message)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == damaged


def test_resume_refuses_another_models_checkpoint(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "2", "--stop-after", "1", "--quiet") == 0
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--subset", "64",
                 "--epochs", "2", "--stop-after", "1", "--quiet",
                 "--out", str(tmp_path / "cnn")]) == 0  # fmt: skip
    shutil.copy(tmp_path / "cnn" / "checkpoint.pt", tmp_path / "run" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert_one_line_error(capsys.readouterr().err, "trained with model 'cnn', not 'mlp'")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.distributed
def test_a_two_process_run_resumed_on_one_process_is_refused_and_left_as_it_was(tmp_path,
                                                                                capsys):  # fmt: skip
    assert _train(tmp_path, "--epochs", "2", "--stop-after", "1", "--nproc", "2", "--quiet") == 0
    before = _files(tmp_path / "run")
    assert "checkpoint.pt" in before
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin train: error: cannot resume",
                          "written by 2 process(es) (--nproc 2), not 1")  # fmt: skip
    assert _files(tmp_path / "run") == before


def test_resume_refuses_weights_that_do_not_fit_the_model_and_changes_nothing(tmp_path, capsys):
    # A well-formed checkpoint (its checksum matches) of the run's settings whose weights
    # are another model's.
    assert _train(tmp_path, "--epochs", "2", "--stop-after", "1", "--quiet") == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    state["model"] = build_model("cnn", 10, (1, 8, 8)).state_dict()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", state)
    before = _files(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "flatmin train: error:",
                          "saved weights do not fit the model 'mlp' for digits")  # fmt: skip
    assert _files(tmp_path / "run") == before


# --- errors of every kind are one line ------------------------------------------------


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
    assert _train(tmp_path, "--epochs", "1", "--quiet") == 0
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
