import json
import math

import pytest
import torch
import torch.nn.functional as F

from flatmin.train import checkpoint as ckpt
from flatmin.train.config import TrainConfig, lr_factor, resume_conflicts
from flatmin.train.loop import Trainer, divergence_message, evaluate
from flatmin.train.registry import METHODS
from tests.helpers import assert_runs_equal, without_timings

# Settings under which each method's own state matters within 4 short epochs: the SAF and
# MESA terms are active from the second epoch (the store and the teacher must come back),
# LookSAM's period straddles the resume point (its counter and g_v must come back).
FAST = {
    "saf": {"start_epoch": 0, "lag_epochs": 1},
    "mesa": {"start_epoch": 0, "ema_decay": 0.9},
    "looksam": {"k": 4},
}


def _config(method: str = "sgd", **overrides) -> TrainConfig:
    settings = dict(
        method=method,
        dataset="digits",
        model="cnn",  # has BatchNorm: its buffers must survive a resume too
        epochs=4,
        batch_size=32,
        subset=96,
        label_noise=0.2,
        hyperparameters=dict(FAST.get(method, {})),
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _state(run_dir):
    return torch.load(run_dir / ckpt.CHECKPOINT_NAME, weights_only=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_bit_exact(tmp_path, method):
    straight = Trainer(_config(method), tmp_path / "straight", progress=False).run()
    Trainer(_config(method), tmp_path / "split", progress=False).run(stop_after=2)
    resumed = Trainer(_config(method), tmp_path / "split", progress=False).run(resume=True)

    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert a["epoch"] == b["epoch"] == 4
    assert_runs_equal(a, b, ("model", "optimizer", "scheduler", "method_state", "rng"))
    assert without_timings(straight) == without_timings(resumed)
    assert without_timings(ckpt.read_metrics(tmp_path / "split" / "metrics.jsonl")) == (
        without_timings(straight)
    )


def test_checkpoint_contract(tmp_path):
    Trainer(_config("sam", epochs=1), tmp_path, progress=False).run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain torch.load
    assert set(state) == {*ckpt.CHECKPOINT_KEYS, "checksum"}
    config = state["config"]
    for key in ("method", "model", "dataset", "data_dir", "seed", "rho", "lr", "momentum"):
        assert key in config
    assert (config["method"], config["model"], config["dataset"]) == ("sam", "cnn", "digits")
    assert state["epoch"] == 1
    # torch's layout, the base optimizer's momentum in each parameter's state
    assert set(state["optimizer"]) == {"state", "param_groups"}
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert state["world_size"] == 1
    assert state["checksum"] == ckpt.state_checksum(state)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["method"] == "sam"
    assert on_disk["data"]["num_flipped"] == round(0.2 * 96)
    (record,) = ckpt.read_metrics(tmp_path / "metrics.jsonl")
    for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                "images_per_s", "wall_time"):  # fmt: skip
        assert key in record
    # The saved config rebuilds the same run.
    assert TrainConfig.from_dict(config).to_dict() == config


def test_ctrl_c_keeps_the_last_complete_epoch(tmp_path):
    def interrupt(epoch, step):
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt

    trainer = Trainer(_config("saf"), tmp_path / "run", progress=False, step_callbacks=[interrupt])
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    state = _state(tmp_path / "run")
    assert state["epoch"] == 1
    assert [r["epoch"] for r in ckpt.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*"))

    # Resuming the interrupted run gives exactly the uninterrupted one.
    Trainer(_config("saf"), tmp_path / "run", progress=False).run(resume=True)
    Trainer(_config("saf"), tmp_path / "straight", progress=False).run()
    assert_runs_equal(_state(tmp_path / "straight"), _state(tmp_path / "run"))


def test_a_diverged_run_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    def blow_up(epoch, step):  # as a too-large step would: the weights turn NaN in epoch 2
        if epoch == 1 and step == 0:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    seen = []
    trainer = Trainer(_config("sam"), tmp_path / "run", progress=False,
                      step_callbacks=[blow_up], epoch_callbacks=[seen.append])  # fmt: skip
    records = trainer.run()
    assert seen == records
    assert [r["epoch"] for r in records] == [1, 2]  # of 4: it stopped
    assert records[-1]["diverged"] is True and "diverged" not in records[0]
    on_disk = ckpt.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("diverged", False) for r in on_disk] == [False, True]
    state = _state(tmp_path / "run")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert divergence_message(tmp_path / "run" / "checkpoint.pt", 2) == (
        f"diverged: the weights are not finite after epoch 2; training stopped, "
        f"{tmp_path / 'run' / 'checkpoint.pt'} keeps epoch 1"
    )

    # Resuming continues from the finite epoch 1, as the uninterrupted run would have.
    resumed = Trainer(_config("sam"), tmp_path / "run", progress=False).run(resume=True)
    straight = Trainer(_config("sam"), tmp_path / "straight", progress=False).run()
    assert without_timings(resumed) == without_timings(straight)


def test_an_existing_run_is_not_overwritten(tmp_path):
    Trainer(_config(epochs=1), tmp_path, progress=False).run()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run.*--resume"):
        Trainer(_config(epochs=1), tmp_path, progress=False).run()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_another_method_model_or_dataset(tmp_path):
    Trainer(_config(epochs=2), tmp_path, progress=False).run(stop_after=1)
    for changed, reason in [
        ({"method": "sam"}, "trained with method 'sgd', not 'sam'"),
        ({"model": "mlp"}, "trained with model 'cnn', not 'mlp'"),
        ({"dataset": "mnist1d", "model": "cnn"}, "trained with dataset 'digits'"),
        ({"label_noise": 0.4}, "label_noise 0.2 → 0.4"),
    ]:
        with pytest.raises(ValueError, match=reason):
            Trainer(_config(epochs=2, **changed), tmp_path, progress=False).run(resume=True)
    assert _state(tmp_path)["epoch"] == 1


def test_resume_conflicts_ignores_thread_count():
    config = _config().resolved().to_dict()
    assert resume_conflicts(config, {**config, "threads": 2}) == []


def test_config_rejects_unknown_names_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'.*mlp.*resnet18"):
        _config(model="vgg").resolved()
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*mnist1d.*cifar100"):
        _config(dataset="svhn").resolved()
    with pytest.raises(ValueError, match=r"unknown method 'lion'.*sgd.*mesa"):
        _config(method="lion").resolved()


def test_cosine_and_step_schedules_closed_form():
    cosine = lr_factor(_config(epochs=4, schedule="cosine").resolved(), steps_per_epoch=10)
    assert cosine(0) == 1.0
    assert cosine(20) == pytest.approx(0.5)
    assert cosine(10) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    step = lr_factor(_config(epochs=4, schedule="step", step_milestones=(0.5, 0.75)).resolved(), 10)
    assert [step(s) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = lr_factor(_config(epochs=4, warmup_epochs=1).resolved(), 10)
    assert [warm(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert warm(10) == 1.0  # cosine starts after the warm-up


def test_logged_learning_rate_follows_the_schedule(tmp_path):
    records = Trainer(_config(epochs=2, schedule="step", step_milestones=(0.5,)), tmp_path,
                      progress=False).run()  # fmt: skip
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.01])


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    loss, acc = evaluate(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)))
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_tracked_sharpness_is_the_sam_sharpness_of_the_saved_weights(tmp_path):
    config = _config("sgd", model="mlp", epochs=1, track_sharpness=True, label_noise=0.0)
    (record,) = Trainer(config, tmp_path, progress=False).run()

    from flatmin.train.data import load_dataset
    from flatmin.train.models import build_model

    bundle = load_dataset("digits", seed=0, subset=96)
    model = build_model("mlp", bundle.num_classes, bundle.input_shape)
    model.load_state_dict(_state(tmp_path)["model"])
    x = torch.stack([bundle.train[i][0] for i in range(32)])
    y = torch.stack([bundle.train[i][1] for i in range(32)])
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g, strict=True):
            p.add_(0.05 * t / norm)
        perturbed = F.cross_entropy(model(x), y)
    assert record["sharpness"] == pytest.approx(
        float(perturbed - loss.detach()), rel=1e-4, abs=1e-7
    )


def test_validation_split_is_evaluated(tmp_path):
    """The logged validation loss and accuracy are those of the saved weights on the
    held-out quarter of the training subset (clean labels)."""
    (record,) = Trainer(_config(epochs=1, val_fraction=0.25), tmp_path, progress=False).run()
    run = ckpt.load_run(tmp_path)
    val = run.data.val
    assert len(val) == 24
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        logits = run.model(x)
    assert record["val_loss"] == pytest.approx(
        float(F.cross_entropy(logits, val.targets)), rel=1e-6
    )
    assert record["val_acc"] == int((logits.argmax(1) == val.targets).sum()) / len(val)


def test_logged_train_loss_is_the_label_smoothed_mean_over_the_epoch(tmp_path):
    """With lr = 0 the weights never move, so the epoch's training loss is the smoothed
    cross-entropy of the initial model over the (noisy) training set."""
    config = _config(model="mlp", epochs=1, label_smoothing=0.1, hyperparameters={"lr": 0.0})
    (record,) = Trainer(config, tmp_path, progress=False).run()

    from flatmin.train.data import load_dataset
    from flatmin.train.models import build_model

    bundle = load_dataset("digits", seed=0, label_noise=0.2, subset=96)
    torch.manual_seed(0)
    model = build_model("mlp", bundle.num_classes, bundle.input_shape)
    x = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits, bundle.train.targets, label_smoothing=0.1)
    assert record["train_loss"] == pytest.approx(float(expected), rel=1e-5)
    accuracy = (logits.argmax(1) == bundle.train.targets).float().mean()
    assert record["train_acc"] == pytest.approx(float(accuracy))
