import numpy as np
import pytest
import torch

from flatmin.trajectory.logit_store import NEVER_WRITTEN, LogitStore


def _snapshot(store: LogitStore) -> tuple[torch.Tensor, torch.Tensor]:
    return store.logits.clone(), store.written_epoch.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_returns_exactly_the_logits_of_lag_epochs_ago_over_a_shuffled_run(dtype):
    num_samples, num_classes, lag, batch = 23, 4, 3, 5
    store = LogitStore(num_samples, num_classes, lag, dtype=dtype)
    history: dict[int, torch.Tensor] = {}  # epoch -> (num_samples, C) logits, kept here
    for epoch in range(8):
        history[epoch] = torch.randn(num_samples, num_classes) * 10
        for idx in torch.randperm(num_samples).split(batch):
            out = store.exchange(history[epoch][idx], idx, epoch)
            assert out.valid.tolist() == [epoch >= lag] * len(idx)
            if epoch >= lag:
                expected = history[epoch - lag][idx].to(dtype)
                assert torch.equal(out.rows[0], expected)


def test_first_visits_and_skipped_epochs_are_invalid():
    store = LogitStore(4, 2, 2, dtype=torch.float32)
    everyone = torch.arange(4)
    store.exchange(torch.randn(4, 2), everyone, epoch=0)
    # Samples 0 and 1 skip epoch 1, so at epoch 3 they have no target of epoch 1.
    store.exchange(torch.randn(2, 2), torch.tensor([2, 3]), epoch=1)
    out = store.exchange(torch.randn(4, 2), everyone, epoch=2)
    assert out.valid.tolist() == [True, True, True, True]  # all written at epoch 0
    out = store.exchange(torch.randn(4, 2), everyone, epoch=3)
    assert out.valid.tolist() == [False, False, True, True]  # 0, 1 skipped epoch 1
    out = store.exchange(torch.randn(4, 2), everyone, epoch=6)
    assert not out.valid.any()  # nothing was written at epoch 4


def test_a_sample_is_compared_and_recorded_once_per_epoch():
    store = LogitStore(3, 2, 1, dtype=torch.float32)
    past = torch.randn(3, 2)
    store.exchange(past, torch.arange(3), epoch=0)
    first_batch = torch.randn(3, 2)
    idx = torch.tensor([1, 1, 2])  # index 1 repeated in the batch
    out = store.exchange(first_batch, idx, epoch=1)
    assert out.valid.tolist() == [True, False, True]
    assert torch.equal(out.rows[0][0], past[1])
    assert torch.equal(store.logits[0, 1], first_batch[0])  # first occurrence kept
    # A later batch of the same epoch repeats index 2: no target, no overwrite.
    out = store.exchange(torch.randn(1, 2), torch.tensor([2]), epoch=1)
    assert out.valid.tolist() == [False]
    assert torch.equal(store.logits[0, 2], first_batch[2])
    assert store.written_epoch[0].tolist() == [0, 1, 1]


def test_record_false_reads_without_writing():
    store = LogitStore(3, 2, 1, dtype=torch.float32)
    store.exchange(torch.randn(3, 2), torch.arange(3), epoch=0)
    before = _snapshot(store)
    out = store.exchange(torch.randn(3, 2), torch.arange(3), epoch=1, record=False)
    assert out.valid.all()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(store), strict=True))


def test_half_precision_error_bound_in_the_normal_range():
    # float16 keeps 11 significant bits: round-to-nearest errs by at most 2**-11 relative
    # for magnitudes in the normal range [2**-14, 65504].
    store = LogitStore(256, 64, 1, dtype=torch.float16)
    exponents = torch.empty(256, 64, dtype=torch.float64).uniform_(-14, 15.99)
    signs = torch.where(torch.rand(256, 64) < 0.5, -1.0, 1.0).double()
    logits = signs * torch.exp2(exponents)
    store.exchange(logits, torch.arange(256), epoch=0)
    out = store.exchange(torch.zeros(256, 64), torch.arange(256), epoch=1)
    error = (out.rows[0].double() - logits).abs()
    assert torch.all(error <= 2.0**-11 * logits.abs())
    assert error.max() > 0  # the bound is exercised, not trivially met


def test_non_finite_rows_are_never_written():
    store = LogitStore(4, 3, 1, dtype=torch.float16)
    old = torch.randn(4, 3)
    store.exchange(old, torch.arange(4), epoch=0)
    new = torch.randn(4, 3)
    new[1, 0] = float("nan")
    new[2, 2] = 1e6  # finite in float32, inf in float16
    out = store.exchange(new, torch.arange(4), epoch=1)
    assert out.skipped.item() == 2
    assert torch.equal(store.logits[0, [1, 2]], old[[1, 2]].half())
    assert store.written_epoch[0].tolist() == [1, 0, 0, 1]
    assert torch.equal(store.logits[0, [0, 3]], new[[0, 3]].half())


@pytest.mark.parametrize(
    ("logits", "indices", "error", "message"),
    [
        (torch.randn(3, 5), torch.tensor([0, 1, 2]), ValueError, r"\(B, 4\)"),
        (torch.randn(3, 4), torch.tensor([0, 1]), ValueError, r"shape \(3,\)"),
        (torch.randn(3, 4), torch.tensor([[0, 1, 2]]), ValueError, r"shape \(3,\)"),
        (torch.randn(3, 4), torch.tensor([0, 1, 6]), ValueError, r"\[0, 6\)"),
        (torch.randn(3, 4), torch.tensor([-1, 1, 2]), ValueError, r"\[0, 6\)"),
        (torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
        (torch.randn(3, 4), None, TypeError, "WithIndex"),
        (torch.arange(12).view(3, 4), torch.tensor([0, 1, 2]), TypeError, "floating"),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(logits, indices, error, message):
    store = LogitStore(6, 4, 2)
    store.exchange(torch.randn(6, 4), torch.arange(6), epoch=0)
    before = _snapshot(store)
    with pytest.raises(error, match=message):
        store.exchange(logits, indices, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(store), strict=True))


def test_memory_bytes_formula():
    store = LogitStore(50, 10, 3, dtype=torch.float16)
    assert store.memory_bytes == 50 * 10 * 3 * 2 + 50 * 3 * 4
    assert LogitStore(50, 10, 2, dtype=torch.float32).memory_bytes == 50 * 10 * 2 * 4 + 50 * 2 * 4


def test_memmap_store_lives_in_the_file(tmp_path):
    path = tmp_path / "store.bin"
    store = LogitStore(7, 3, 2, dtype=torch.float16, memmap_path=path)
    assert path.stat().st_size == 7 * 3 * 2 * 2
    logits = torch.randn(7, 3)
    store.exchange(logits, torch.arange(7), epoch=1)
    store.flush()
    on_disk = np.fromfile(path, dtype=np.float16).reshape(2, 7, 3)
    assert np.array_equal(on_disk[1], logits.half().numpy())
    assert np.all(on_disk[0] == 0)


def test_state_dict_round_trip_is_exact():
    store = LogitStore(5, 3, 2)
    for epoch in range(3):
        store.exchange(torch.randn(5, 3), torch.randperm(5), epoch)
    copy = LogitStore(5, 3, 2)
    copy.load_state_dict(store.state_dict())
    assert torch.equal(copy.logits, store.logits)
    assert torch.equal(copy.written_epoch, store.written_epoch)
    with pytest.raises(ValueError, match=r"shape \(2, 6, 3\)"):
        LogitStore(6, 3, 2).load_state_dict(store.state_dict())


def test_never_written_slots_are_never_valid_even_for_early_epochs():
    store = LogitStore(2, 2, 3)
    assert torch.all(store.written_epoch == NEVER_WRITTEN)
    for epoch in range(3):  # epoch - lag is negative here: must not match an empty slot
        assert not store.exchange(torch.randn(2, 2), torch.arange(2), epoch).valid.any()
