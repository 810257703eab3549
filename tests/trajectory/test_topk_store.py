import numpy as np
import pytest
import torch

from flatmin.trajectory.logit_store import LogitStore
from flatmin.trajectory.topk_store import TopKLogitStore, class_dtype

pytestmark = pytest.mark.usefixtures("topk_path")


def _tempered_rest(logits: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """``log Σ_{j∉top k} exp(z_j/τ)`` in float64, from a sort (not the store's topk)."""
    ordered = logits.double().sort(dim=1, descending=True).values
    return torch.logsumexp(ordered[:, k:] / tau, dim=1)


@pytest.mark.parametrize(
    ("num_classes", "dtype"),
    [(2, torch.uint8), (256, torch.uint8), (257, torch.int16), (32_768, torch.int16),
     (32_769, torch.int32), (21_841, torch.int16)],
)  # fmt: skip
def test_classes_use_the_narrowest_integer_type_that_holds_them(num_classes, dtype):
    assert class_dtype(num_classes) == dtype


@pytest.mark.parametrize(("classes", "k"), [(10, 3), (300, 5), (40, 40)])
def test_returns_the_top_k_of_exactly_lag_epochs_ago_over_a_shuffled_run(classes, k):
    num_samples, lag, tau = 17, 2, 5.0
    store = TopKLogitStore(num_samples, classes, lag, top_k=k)
    history = {}
    for epoch in range(5):
        history[epoch] = torch.randn(num_samples, classes) * 10
        for idx in torch.randperm(num_samples).split(4):
            out = store.exchange(history[epoch][idx], idx, epoch, tau=tau)
            assert out.valid.tolist() == [epoch >= lag] * len(idx)
            if epoch < lag:
                continue
            values, got_classes, rest = store.unpack(out.rows)
            past = history[epoch - lag][idx]
            expected = past.sort(dim=1, descending=True)
            assert torch.equal(values, expected.values[:, :k].half())
            assert torch.equal(got_classes.long(), expected.indices[:, :k])
            assert got_classes.dtype == class_dtype(classes)
            if k == classes:
                assert torch.all(rest == float("-inf"))
            else:
                torch.testing.assert_close(rest.double(), _tempered_rest(past, k, tau))


def test_validity_records_and_skips_are_those_of_the_full_store():
    """Repeated indices, skipped epochs and non-finite rows (NaN, inf, and a value that
    overflows float16 only) are handled exactly as by the full store."""
    full, top = LogitStore(6, 5, 2), TopKLogitStore(6, 5, 2, top_k=2)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (0, [0, 1, 2, 3, 4, 5]), (1, [2, 2, 3]), (1, [3, 0]), (2, [0, 1, 2, 3, 4, 5]),
        (3, [5, 4, 5, 1]), (4, [0, 1, 2, 3, 4, 5]), (6, [0, 1, 2, 3, 4, 5]),
    ]  # fmt: skip
    for epoch, indices in batches:
        idx = torch.tensor(indices)
        logits = torch.randn(len(idx), 5, generator=gen)
        # finite in float16 from below 65520 (65519 rounds to 65504), not from 65520 on
        logits[0, 1] = [float("nan"), float("inf"), 7e4, -7e4, 65519.0, 2.0, -65520.0][epoch]
        a = full.exchange(logits, idx, epoch)
        b = top.exchange(logits, idx, epoch, tau=2.0)
        assert torch.equal(a.valid, b.valid), (epoch, indices)
        assert int(a.skipped) == int(b.skipped)
        assert torch.equal(full.written_epoch, top.written_epoch), (epoch, indices)
    assert int(full.written_epoch.max()) == 6
    assert full.written_epoch[0, 0] == 4 and full.written_epoch[0, 0] == top.written_epoch[0, 0]


def test_rows_pack_and_unpack_exactly_in_every_layout():
    gen = torch.Generator().manual_seed(1)
    for classes in (3, 300, 40_000):
        for k in (1, 2, 3):
            for dtype in (torch.float16, torch.float32):
                store = TopKLogitStore(4, classes, 1, top_k=k, dtype=dtype)
                values = torch.randn(5, k, generator=gen).to(dtype)
                picked = torch.randint(0, classes, (5, k), generator=gen).to(store.class_dtype)
                rest = torch.randn(5, generator=gen)
                (packed,) = store.pack(values, picked, rest)
                assert packed.shape == (5, store.row_bytes) and store.row_bytes % 4 == 0
                unpacked = store.unpack((packed,))
                assert torch.equal(unpacked.values, values)
                assert torch.equal(unpacked.classes, picked)
                assert torch.equal(unpacked.rest_lse, rest)


@pytest.mark.parametrize(
    ("classes", "k", "row_bytes"),
    # 4 bytes of rest_lse + k float16 values + k classes (uint8 / int16 / int32), to 4 bytes
    [(10, 5, 20), (100, 10, 36), (100, 20, 64), (1000, 5, 24), (1000, 10, 44),
     (21_841, 20, 84), (40_000, 3, 24)],
)  # fmt: skip
def test_memory_bytes_are_the_rows_and_the_epochs(classes, k, row_bytes):
    store = TopKLogitStore(50, classes, 3, top_k=k)
    assert store.row_bytes == row_bytes
    assert store.memory_bytes == 50 * 3 * (row_bytes + 4)
    assert store.memory_bytes == sum(
        t.numel() * t.element_size() for t in store.state_dict().values()
    )


def test_a_store_on_the_meta_device_counts_its_bytes_without_allocating():
    store = TopKLogitStore(14_197_122, 21_841, 3, top_k=10, device="meta")
    assert store.table.device.type == "meta"
    assert store.memory_bytes == 14_197_122 * 3 * (44 + 4)


def test_memmap_store_lives_in_the_file(tmp_path):
    path = tmp_path / "store.bin"
    store = TopKLogitStore(7, 300, 2, top_k=3, memmap_path=path)
    assert path.stat().st_size == 2 * 7 * store.row_bytes
    assert store.memory_bytes == path.stat().st_size + 2 * 7 * 4  # + the epochs in memory
    logits = torch.randn(7, 300)
    store.exchange(logits, torch.arange(7), epoch=1, tau=5.0)
    store.flush()
    on_disk = torch.from_numpy(np.fromfile(path, dtype=np.uint8).reshape(2, 7, store.row_bytes))
    values, classes, _ = store.unpack((on_disk[1],))
    top = logits.topk(3, dim=1)
    assert torch.equal(values, top.values.half()) and torch.equal(classes.long(), top.indices)
    assert torch.all(on_disk[0] == 0)


def test_state_dict_round_trip_is_exact_and_a_full_state_is_refused():
    store = TopKLogitStore(5, 12, 2, top_k=4)
    for epoch in range(3):
        store.exchange(torch.randn(5, 12), torch.randperm(5), epoch, tau=3.0)
    copy = TopKLogitStore(5, 12, 2, top_k=4)
    copy.load_state_dict(store.state_dict())
    assert torch.equal(copy.table, store.table)
    assert torch.equal(copy.written_epoch, store.written_epoch)
    before = copy.table.clone()
    with pytest.raises(ValueError, match=r"keys \['rows', 'written_epoch'\]"):
        copy.load_state_dict(LogitStore(5, 12, 2).state_dict())
    with pytest.raises(ValueError, match=r"rows of shape \(2, 5, 16\).*got \(2, 5, 12\)"):
        copy.load_state_dict(TopKLogitStore(5, 12, 2, top_k=2).state_dict())
    assert torch.equal(copy.table, before)


def test_bad_settings_and_a_missing_temperature_are_refused():
    with pytest.raises(ValueError, match="top_k must be an integer >= 1 and <= 10, got 11"):
        TopKLogitStore(5, 10, 2, top_k=11)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        TopKLogitStore(5, 10, 2, top_k=0)
    with pytest.raises(TypeError, match="top_k must be an integer"):
        TopKLogitStore(5, 10, 2, top_k=2.0)
    store = TopKLogitStore(5, 10, 2, top_k=2)
    with pytest.raises(ValueError, match="needs the temperature tau > 0"):
        store.exchange(torch.randn(2, 10), torch.arange(2), 0)
    with pytest.raises(ValueError, match=r"expected logits of shape \(B, 10\)"):
        store.exchange(torch.randn(2, 9), torch.arange(2), 0, tau=1.0)
    with pytest.raises(AttributeError, match="keeps no full logits"):
        store.logits  # noqa: B018
    assert torch.all(store.table == 0)


def test_a_state_with_classes_outside_the_store_is_refused_and_nothing_is_copied():
    store = TopKLogitStore(5, 12, 2, top_k=3)
    store.exchange(torch.randn(5, 12), torch.arange(5), 0, tau=3.0)
    damaged = {name: t.clone() for name, t in store.state_dict().items()}
    start, _ = store._fields["classes"]
    damaged["rows"][0, 2, start + 1] = 12  # class 12 of 12 classes
    before = store.table.clone()
    with pytest.raises(ValueError, match=r"stored classes in \[0, 12\), got values in \[0, 12\]"):
        store.load_state_dict(damaged)
    assert torch.equal(store.table, before)


def test_encode_refuses_logits_of_another_width():
    store = TopKLogitStore(5, 12, 2, top_k=5)
    with pytest.raises(ValueError, match=r"expected logits of shape \(B, 12\), got \(4, 3\)"):
        store.encode(torch.randn(4, 3), tau=1.0)
