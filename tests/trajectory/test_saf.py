import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import flatmin
from flatmin.trajectory import SAF
from tests.helpers import assert_resumes_bit_exactly
from tests.trajectory.helpers import bn_mlp, numpy_bucketed_kl, numpy_tempered_kl


def _numpy_term(z: np.ndarray, past: np.ndarray, lam: float, tau: float) -> float:
    return lam * numpy_tempered_kl(z, past, tau)


def test_public_name_is_this_class():
    assert flatmin.SAF is SAF


def test_zero_before_start_epoch_then_the_kl_against_lag_epochs_ago():
    saf = SAF(num_samples=6, num_classes=4, lam=0.3, tau=5.0, lag_epochs=2, start_epoch=3)
    idx = torch.arange(6)
    history = {}
    for epoch in range(7):
        saf.set_epoch(epoch)
        history[epoch] = torch.randn(6, 4, dtype=torch.float64) * 5
        logits = history[epoch].clone().requires_grad_()
        term = saf(logits, idx)
        if epoch <= 3:  # official convention: active when epoch > start_epoch
            assert term.item() == 0.0 and term.requires_grad
        else:
            past = history[epoch - 2].to(torch.float16).double().numpy()
            expected = _numpy_term(history[epoch].numpy(), past, 0.3, 5.0)
            assert math.isclose(term.item(), expected, rel_tol=1e-6)
        term.backward()


def test_term_is_exactly_zero_when_the_present_repeats_the_stored_past():
    saf = SAF(5, 3, lag_epochs=1, start_epoch=0, store_dtype=torch.float32)
    z = torch.randn(5, 3)
    saf(z, torch.arange(5))
    saf.set_epoch(1)
    assert saf(z.clone(), torch.arange(5)).item() == 0.0


def test_gradient_is_the_closed_form_and_skips_rows_without_a_target():
    lam, tau = 0.3, 5.0
    saf = SAF(8, 5, lam=lam, tau=tau, lag_epochs=1, start_epoch=0, store_dtype=torch.float32)
    past = torch.randn(8, 5, dtype=torch.float64) * 3
    saf(past[:6], torch.arange(6))  # samples 6 and 7 are not seen in epoch 0
    saf.set_epoch(1)
    z = (torch.randn(8, 5, dtype=torch.float64) * 3).requires_grad_()
    saf(z, torch.arange(8)).backward()
    stored = past.float().double()
    q, p = torch.softmax(z.detach() / tau, 1), torch.softmax(stored / tau, 1)
    closed_form = lam * tau * (q - p) / 6  # mean over the 6 rows that have a target
    torch.testing.assert_close(z.grad[:6], closed_form[:6], rtol=1e-6, atol=1e-12)
    assert torch.all(z.grad[6:] == 0)


def test_a_second_pass_over_the_same_batch_reuses_targets_and_records_nothing():
    saf = SAF(6, 3, lam=0.3, tau=5.0, lag_epochs=1, start_epoch=0)
    past = torch.randn(6, 3, dtype=torch.float64)
    saf(past, torch.arange(6))
    saf.set_epoch(1)
    idx = torch.tensor([4, 0, 2])
    first_pass = torch.randn(3, 3, dtype=torch.float64)
    saf(first_pass, idx)
    store_after_first = saf.store.logits.clone()
    perturbed = first_pass * 1.5
    term_second = saf(perturbed, idx.clone())  # equal indices, another tensor
    target = past[idx].half().double().numpy()
    expected = _numpy_term(perturbed.numpy(), target, 0.3, 5.0)
    assert math.isclose(term_second.item(), expected, rel_tol=1e-6)
    assert torch.equal(saf.store.logits, store_after_first)
    assert torch.equal(saf.store.logits[0, idx], first_pass.half())


def test_record_false_leaves_the_store_alone():
    saf = SAF(4, 3, lag_epochs=1, start_epoch=0)
    past = torch.randn(4, 3, dtype=torch.float64)
    saf(past, torch.arange(4))
    before = saf.store.logits.clone(), saf.store.written_epoch.clone()
    saf.set_epoch(1)
    z = torch.randn(4, 3, dtype=torch.float64)
    expected = _numpy_term(z.numpy(), past.half().double().numpy(), 0.3, 5.0)
    assert math.isclose(saf(z, torch.arange(4), record=False).item(), expected, rel_tol=1e-6)
    assert torch.equal(saf.store.logits, before[0])
    assert torch.equal(saf.store.written_epoch, before[1])


def test_non_finite_rows_warn_with_their_count():
    saf = SAF(4, 3)
    logits = torch.randn(4, 3)
    logits[0, 1] = float("inf")
    logits[3, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="2 logit row"):
        saf(logits, torch.arange(4))
    assert saf.store.written_epoch[0].tolist()[1:3] == [0, 0]


def test_bad_input_names_the_expected_shape_and_changes_nothing():
    saf = SAF(10, 4, lag_epochs=1, start_epoch=0)
    saf(torch.randn(10, 4), torch.arange(10))
    saf.set_epoch(1)
    before = saf.store.logits.clone(), saf.store.written_epoch.clone()
    with pytest.raises(ValueError, match=r"expected logits of shape \(B, 4\)"):
        saf(torch.randn(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match=r"expected indices of shape \(3,\)"):
        saf(torch.randn(3, 4), torch.arange(4))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        saf(torch.randn(3, 4), torch.tensor([1, 2, 10]))
    with pytest.raises(TypeError, match="WithIndex"):
        saf(torch.randn(3, 4), None)
    assert torch.equal(saf.store.logits, before[0])
    assert torch.equal(saf.store.written_epoch, before[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lag_epochs": 0}, ValueError, "lag_epochs must be an integer >= 1, got 0"),
        ({"lag_epochs": 2.0}, TypeError, "lag_epochs must be an integer"),
        ({"tau": 0}, ValueError, "tau must be a finite number > 0.0, got 0"),
        ({"tau": float("inf")}, ValueError, "tau must be a finite number"),
        ({"lam": float("nan")}, ValueError, "lam must be a finite number >= 0.0, got nan"),
        ({"lam": -0.1}, ValueError, "lam must be a finite number >= 0.0"),
        ({"lam": True}, TypeError, "lam must be a finite number"),
        ({"start_epoch": 1.5}, TypeError, "start_epoch must be an integer, got 1.5"),
        ({"num_classes": 0}, ValueError, "num_classes must be an integer >= 1, got 0"),
        ({"store_dtype": torch.bfloat16}, ValueError, "dtype must be one of torch.float16"),
    ],
)
def test_constructor_validation(kwargs, error, message):
    settings = {"num_samples": 10, "num_classes": 4, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        SAF(**settings)


def test_set_epoch_takes_a_non_negative_int():
    saf = SAF(10, 4)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -1"):
        saf.set_epoch(-1)
    with pytest.raises(TypeError, match=r"epoch must be an integer >= 0, got 1\.0"):
        saf.set_epoch(1.0)
    assert saf.epoch == 0


def test_memory_bytes_for_cifar10_and_the_documented_imagenet_figure():
    assert SAF(50_000, 10).memory_bytes == 50_000 * 10 * 3 * 2 + 50_000 * 3 * 4
    n, c = 1_281_167, 1000
    imagenet = n * c * 3 * 2 + n * 3 * 4
    assert round(imagenet / 2**20) == 7346  # the figure SAF's docstring quotes
    assert "7,346 MiB" in SAF.__doc__
    assert "14,643 MB" in SAF.__doc__


def test_float32_store_on_request():
    saf = SAF(3, 2, store_dtype=torch.float32)
    assert saf.store.logits.dtype == torch.float32
    assert saf.memory_bytes == 3 * 2 * 3 * 4 + 3 * 3 * 4


def _parts(seed):
    torch.manual_seed(seed)
    model = bn_mlp(inputs=6, hidden=8)
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "saf": SAF(20, 3, lam=1.0, lag_epochs=2, start_epoch=1),
    }


def _train(parts, epochs, x, y):
    model, opt, saf = parts["model"], parts["optimizer"], parts["saf"]
    for epoch in epochs:
        saf.set_epoch(epoch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(5):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + saf(logits, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_resume_is_bit_exact(tmp_path):
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    straight = assert_resumes_bit_exactly(
        _parts,
        lambda parts, epochs: _train(parts, epochs, x, y),
        epochs=6,
        stop_after=3,
        checkpoint=tmp_path / "checkpoint.pt",
    )
    saf = straight["saf"]
    assert saf.epoch == 5
    assert saf.store.written_epoch.unique().tolist() == [4, 5]  # both slots in use


def test_load_state_dict_rejects_an_incomplete_state_without_changing_anything():
    saf = SAF(4, 3, lag_epochs=2)
    saf(torch.randn(4, 3), torch.arange(4))
    before = saf.store.logits.clone(), saf.store.written_epoch.clone()
    other = SAF(4, 3, lag_epochs=2)
    state = {k: v for k, v in other.state_dict().items() if k != "epoch"}
    with pytest.raises(ValueError, match="missing \\['epoch'\\]"):
        saf.load_state_dict(state)
    with pytest.raises(ValueError, match="lag_epochs=2"):
        saf.load_state_dict(SAF(4, 3, lag_epochs=3).state_dict())
    assert torch.equal(saf.store.logits, before[0])
    assert torch.equal(saf.store.written_epoch, before[1])


def _epochs_of_batches(saf, epochs, num_samples, set_epoch, batch=4):
    """Full passes over ``num_samples`` in batches, with or without ``set_epoch``."""
    for epoch in range(epochs):
        if set_epoch:
            saf.set_epoch(epoch)
        for idx in torch.randperm(num_samples).split(batch):
            saf(torch.randn(len(idx), 3), idx)


def test_a_forgotten_set_epoch_warns_once_in_the_second_pass_naming_it():
    saf = SAF(12, 3, lag_epochs=1, start_epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _epochs_of_batches(saf, 1, 12, set_epoch=False)  # one pass: nothing is wrong yet
        for idx in torch.arange(12).split(4)[:2]:
            saf(torch.randn(4, 3), idx)
    with pytest.warns(RuntimeWarning, match=r"24 rows were recorded in epoch 0.*saf\.set_epoch"):
        saf(torch.randn(4, 3), torch.arange(8, 12))  # the second pass's last batch: 2·N rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per SAF object
        _epochs_of_batches(saf, 3, 12, set_epoch=False)
    assert saf.store.written_epoch.unique().tolist() == [0]  # what the warning is about


def test_calling_set_epoch_with_the_same_epoch_every_epoch_warns_too():
    saf = SAF(12, 3, lag_epochs=1, start_epoch=0)
    with pytest.warns(RuntimeWarning, match="set_epoch") as caught:
        for _ in range(3):
            saf.set_epoch(0)
            _epochs_of_batches(saf, 1, 12, set_epoch=False)
    assert len(caught) == 1


def test_no_warning_for_set_epoch_every_epoch_padded_passes_and_repeated_batches():
    saf = SAF(12, 3, lag_epochs=1, start_epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(4):
            saf.set_epoch(epoch)
            # A DistributedSampler-like pass: every sample, plus 3 padded repeats.
            order = torch.cat([torch.randperm(12), torch.tensor([0, 1, 2])])
            for idx in order.split(5):
                logits = torch.randn(len(idx), 3)
                saf(logits, idx)
                saf(logits * 2, idx)  # SAM's second pass over the same batch
                saf(logits, idx, record=False)
        # A checkpoint and resume in the middle of an epoch starts counting afresh.
        saf.load_state_dict(saf.state_dict())
        _epochs_of_batches(saf, 1, 12, set_epoch=False)


# -- SAF(top_k=k): the compressed store ---------------------------------------------------


def test_top_k_equal_to_num_classes_gives_the_full_stores_terms_and_gradients():
    full = SAF(8, 4, lam=0.5, tau=2.0, lag_epochs=2, start_epoch=1)
    top = SAF(8, 4, lam=0.5, tau=2.0, lag_epochs=2, start_epoch=1, top_k=4)
    for epoch in range(6):
        full.set_epoch(epoch)
        top.set_epoch(epoch)
        for idx in torch.randperm(8).split(3):
            z = (torch.randn(len(idx), 4, dtype=torch.float64) * 3).requires_grad_()
            a, b = full(z, idx), top(z, idx)
            (grad_a,) = torch.autograd.grad(a, z)
            (grad_b,) = torch.autograd.grad(b, z)
            assert math.isclose(a.item(), b.item(), rel_tol=1e-12)
            torch.testing.assert_close(grad_b, grad_a, rtol=1e-12, atol=1e-15)
    assert a.item() > 0
    assert torch.equal(full.store.written_epoch, top.store.written_epoch)


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_term_is_the_bucketed_kl_against_lag_epochs_ago(k):
    saf = SAF(6, 5, lam=0.3, tau=5.0, lag_epochs=2, start_epoch=1, top_k=k)
    idx = torch.arange(6)
    history = {}
    for epoch in range(5):
        saf.set_epoch(epoch)
        history[epoch] = (torch.randn(6, 5) * 5).half().double()  # exact in the store
        term = saf(history[epoch].clone().requires_grad_(), idx)
        if epoch <= 1:
            assert term.item() == 0.0
        else:
            rows = numpy_bucketed_kl(history[epoch].numpy(), history[epoch - 2].numpy(), k, 5.0)
            assert math.isclose(term.item(), 0.3 * rows.mean(), rel_tol=1e-6)
    assert term.item() > 0


def test_top_k_second_pass_reuses_targets_and_record_false_writes_nothing():
    saf = SAF(6, 5, lag_epochs=1, start_epoch=0, top_k=2)
    saf(torch.randn(6, 5), torch.arange(6))
    saf.set_epoch(1)
    idx = torch.tensor([4, 0, 2])
    first = torch.randn(3, 5, dtype=torch.float64)
    term_first = saf(first, idx)
    table = saf.store.table.clone()
    assert torch.equal(saf(first, idx.clone()), term_first)  # SAM's second pass
    saf(torch.randn(3, 5), torch.tensor([1, 3, 5]), record=False)
    assert torch.equal(saf.store.table, table)
    assert torch.equal(saf.store.values[0, idx], first.topk(2, dim=1).values.half())


def test_top_k_skips_and_counts_non_finite_rows_like_the_full_store():
    saf = SAF(4, 3, top_k=1)
    logits = torch.randn(4, 3)
    logits[0, 1] = float("inf")
    logits[3, 0] = 1e6  # finite in float32, inf in float16
    with pytest.warns(RuntimeWarning, match="2 logit row"):
        saf(logits, torch.arange(4))
    assert saf.store.written_epoch[0].tolist()[1:3] == [0, 0]


def _top_k_parts(seed):
    torch.manual_seed(seed)
    model = bn_mlp(inputs=6, hidden=8, classes=5)
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "saf": SAF(20, 5, lam=1.0, lag_epochs=2, start_epoch=1, top_k=2),
    }


def test_top_k_resume_is_bit_exact(tmp_path):
    x, y = torch.randn(20, 6), torch.randint(0, 5, (20,))
    straight = assert_resumes_bit_exactly(
        _top_k_parts,
        lambda parts, epochs: _train(parts, epochs, x, y),
        epochs=6,
        stop_after=3,
        checkpoint=tmp_path / "checkpoint.pt",
    )
    saf = straight["saf"]
    assert saf.state_dict()["top_k"] == 2
    assert saf.store.written_epoch.unique().tolist() == [4, 5]


def test_a_state_of_another_top_k_is_refused_without_changing_anything():
    saf = SAF(4, 3, lag_epochs=2, top_k=2)
    saf(torch.randn(4, 3), torch.arange(4))
    before = saf.store.table.clone(), saf.store.written_epoch.clone()
    with pytest.raises(ValueError, match=r"top_k=2, got top_k=None \(a store of full rows\)"):
        saf.load_state_dict(SAF(4, 3, lag_epochs=2).state_dict())
    with pytest.raises(ValueError, match=r"top_k=2, got top_k=1 \(a store of the top 1 logits"):
        saf.load_state_dict(SAF(4, 3, lag_epochs=2, top_k=1).state_dict())
    with pytest.raises(ValueError, match=r"top_k=None, got top_k=2"):
        SAF(4, 3, lag_epochs=2).load_state_dict(saf.state_dict())
    assert torch.equal(saf.store.table, before[0])
    assert torch.equal(saf.store.written_epoch, before[1])


def test_a_state_saved_before_top_k_existed_loads_into_a_full_store():
    state = SAF(4, 3).state_dict()
    del state["top_k"]
    SAF(4, 3).load_state_dict(state)


@pytest.mark.parametrize(
    ("top_k", "error", "message"),
    [
        (0, ValueError, "top_k must be an integer >= 1 and <= 4, got 0"),
        (5, ValueError, "top_k must be an integer >= 1 and <= 4, got 5"),
        (2.0, TypeError, "top_k must be an integer"),
        (True, TypeError, "top_k must be an integer"),
    ],
)
def test_top_k_validation(top_k, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SAF(10, 4, top_k=top_k)


def test_top_k_memory_bytes_and_the_documented_imagenet_figure():
    n, c = 1_281_167, 1000
    top10 = SAF(n, c, top_k=10, device="meta")
    assert top10.memory_bytes == n * 3 * (4 + 10 * 2 + 10 * 2 + 4)
    assert round(top10.memory_bytes / 2**20) == 176
    assert "176 MiB" in SAF.__doc__
    assert SAF(50, 10, top_k=5).memory_bytes == 50 * 3 * (20 + 4)
