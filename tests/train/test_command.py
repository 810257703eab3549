import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flatmin.cli import build_parser, main
from flatmin.train.registry import METHODS

TINY = ["--dataset", "digits", "--model", "mlp", "--subset", "64", "--batch-size", "32"]


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
        (["--method", "sam", "--rho", "-1"], ["--rho must be >= 0"]),
    ],
)
def test_bad_names_and_values_are_explained(tmp_path, capsys, args, expected):
    assert _train(tmp_path, *args) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
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
def test_nproc_trains_on_two_processes_and_equals_the_distributed_trainer(tmp_path):
    """`flatmin train --nproc 2` runs the same 2-process training as flatmin.distributed."""
    from flatmin.distributed.train import run_distributed
    from flatmin.train import checkpoint as ckpt
    from flatmin.train.loop import TrainConfig

    common = ["--method", "sam", "--dataset", "digits", "--model", "mlp", "--epochs", "1"]
    assert main(["train", *common, "--nproc", "2", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    config = TrainConfig(method="sam", dataset="digits", model="mlp", epochs=1)
    run_distributed(config, tmp_path / "lib", 2)
    via_cli = torch.load(tmp_path / "cli" / ckpt.CHECKPOINT_NAME)["model"]
    via_lib = torch.load(tmp_path / "lib" / ckpt.CHECKPOINT_NAME)["model"]
    assert via_cli.keys() == via_lib.keys()
    assert all(torch.equal(via_cli[k], via_lib[k]) for k in via_cli)


def test_nproc_must_be_positive(tmp_path, capsys):
    code = main(["train", "--method", "sgd", "--dataset", "digits", "--nproc", "0",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "--nproc must be a positive" in capsys.readouterr().err
