import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flatmin.train.data import (
    DATASETS,
    FASHION_MNIST_FILES,
    load_dataset,
    make_loader,
    random_crop_flip,
)
from tests.helpers import write_cifar10, write_fashion_mnist

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d-cache")


def stacked(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys)


# ---------------------------------------------------------------- names and errors


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as err:
        load_dataset("mnist")
    for name in DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_noise": 1.0}, "label_noise"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"subset": 0}, "subset"),
        ({"seed": -1}, "seed"),
        ({"val_fraction": 0.0001}, "both must be ≥ 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **kwargs)


def test_missing_fashion_mnist_names_the_files_and_the_package(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", tmp_path)
    message = str(err.value)
    for name in (*FASHION_MNIST_FILES, "apt-get install dataset-fashion-mnist", "--data-dir"):
        assert name in message


def test_cifar_without_data_dir_says_what_to_pass():
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100")


# ---------------------------------------------------------------- each dataset


def test_mnist1d_shapes_and_cache(mnist1d_cache):
    bundle = load_dataset("mnist1d", mnist1d_cache)
    assert (len(bundle.train), len(bundle.test)) == (4000, 1000)
    assert bundle.input_shape == (1, 40) and bundle.num_classes == 10
    assert Path(bundle.metadata["source"]).is_file()
    x, y = bundle.train[0]
    assert x.shape == (1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = load_dataset("mnist1d", mnist1d_cache)
    assert torch.equal(again.train.inputs, bundle.train.inputs)
    assert torch.equal(again.test.targets, bundle.test.targets)


def test_digits_split_is_fixed_stratified_and_standardized():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=5)
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.input_shape == (1, 8, 8)
    assert torch.equal(a.test.inputs, b.test.inputs)  # the split does not depend on seed
    counts = torch.bincount(a.test.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~180 per class, 360 / 10 held out
    x, _ = stacked(a.train)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5


def test_fashion_mnist_from_written_idx_files(tmp_path):
    arrays = write_fashion_mnist(tmp_path)
    bundle = load_dataset("fashion-mnist", tmp_path)
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["t10k"]
    assert bundle.input_shape == (1, 28, 28)
    assert torch.equal(bundle.train.targets, torch.from_numpy(train_labels.astype(np.int64)))
    # Standardization with the training set's own mean and std, computed here in float64.
    scaled = train_images / 255.0
    mean, std = scaled.mean(), scaled.std()
    x, y = bundle.test[3]
    np.testing.assert_allclose(
        x[0].numpy(), (test_images[3] / 255.0 - mean) / std, rtol=1e-5, atol=1e-6
    )
    assert int(y) == test_labels[3]


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    bundle = load_dataset("fashion-mnist")
    assert (len(bundle.train), len(bundle.test)) == (60_000, 10_000)
    assert bundle.metadata["source"] == str(FASHION_DIR)
    # The widely quoted Fashion-MNIST training statistics: mean 0.2860, std 0.3530.
    assert bundle.metadata["mean"][0] == pytest.approx(0.2860, abs=1e-4)
    assert bundle.metadata["std"][0] == pytest.approx(0.3530, abs=1e-4)
    assert torch.equal(torch.bincount(bundle.test.targets), torch.full((10,), 1000))


def test_cifar10_from_written_pickles(tmp_path):
    _, batches = write_cifar10(tmp_path, per_batch=4, num_test=6)
    train_raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_raw = train_raw.reshape(-1, 3, 32, 32)
    test_raw = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    bundle = load_dataset("cifar10", tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (20, 6)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    assert bundle.metadata["augment"] is True
    scaled = train_raw / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    expected = (test_raw[4] / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(bundle.test[4][0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_cifar100_has_100_classes(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 8), ("test", 3)):
        batch = {
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}))
    bundle = load_dataset("cifar100", folder, label_noise=0.5)
    assert bundle.num_classes == 100 and len(bundle.train) == 8
    assert bundle.metadata["num_flipped"] == 4


def test_names_are_case_and_underscore_insensitive(tmp_path):
    write_fashion_mnist(tmp_path)
    assert load_dataset("Fashion_MNIST", tmp_path).name == "fashion-mnist"


def test_items_are_copies_not_views_of_the_stored_data(mnist1d_cache):
    bundle = load_dataset("mnist1d", mnist1d_cache)
    before = bundle.train.inputs[0].clone()
    x, _ = bundle.train[0]
    x.add_(1.0)
    assert torch.equal(bundle.train.inputs[0], before)


# ---------------------------------------------------------------- label noise and splits


def test_label_noise_is_symmetric_exact_and_reproducible(mnist1d_cache):
    p = 0.4
    clean = load_dataset("mnist1d", mnist1d_cache)
    a = load_dataset("mnist1d", mnist1d_cache, seed=1, label_noise=p)
    b = load_dataset("mnist1d", mnist1d_cache, seed=1, label_noise=p)
    c = load_dataset("mnist1d", mnist1d_cache, seed=2, label_noise=p)
    assert torch.equal(a.train.targets, b.train.targets)
    assert not torch.equal(a.train.targets, c.train.targets)
    flipped = a.train.targets != clean.train.targets
    assert int(flipped.sum()) == round(p * 4000)
    assert a.metadata["num_flipped"] == 1600 and a.metadata["flipped_fraction"] == p
    assert torch.equal(a.train.clean_targets, clean.train.targets)
    assert torch.equal(a.test.targets, clean.test.targets)  # the test set is never noised
    assert torch.equal(a.train.inputs, clean.train.inputs)
    # The new class is uniform over the 9 other classes: shift (noisy − true) mod 10.
    shift = (a.train.targets[flipped] - clean.train.targets[flipped]) % 10
    counts = torch.bincount(shift, minlength=10).double()
    assert counts[0] == 0
    expected = 1600 / 9
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # the 0.1 % tail of chi-square with 8 degrees of freedom


def test_validation_is_held_out_before_noise(mnist1d_cache):
    full = load_dataset("mnist1d", mnist1d_cache)
    bundle = load_dataset("mnist1d", mnist1d_cache, seed=3, val_fraction=0.1, label_noise=0.5)
    assert (len(bundle.train), len(bundle.val)) == (3600, 400)
    assert bundle.val.augment is False
    label_of = {row.numpy().tobytes(): int(y) for row, y in zip(*stacked(full.train), strict=True)}
    train_rows = {row.numpy().tobytes() for row in bundle.train.inputs}
    val_rows = [row.numpy().tobytes() for row in bundle.val.inputs]
    assert train_rows.isdisjoint(val_rows)
    assert len(train_rows | set(val_rows)) == 4000
    # Validation labels are the clean ones.
    assert [label_of[r] for r in val_rows] == bundle.val.targets.tolist()
    assert bundle.metadata["num_flipped"] == 1800  # noise counts the remaining 3,600 only


def test_subset_is_seeded(mnist1d_cache):
    a = load_dataset("mnist1d", mnist1d_cache, subset=100, seed=0)
    b = load_dataset("mnist1d", mnist1d_cache, subset=100, seed=0)
    c = load_dataset("mnist1d", mnist1d_cache, subset=100, seed=1)
    assert (len(a.train), len(a.test)) == (100, 100)
    assert a.metadata["num_train"] == 100
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_loading_leaves_global_rngs_alone(mnist1d_cache):
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()  # noqa: NPY002 (the legacy global RNG is the subject)
    load_dataset("mnist1d", mnist1d_cache, label_noise=0.3, val_fraction=0.2, subset=500)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    np.testing.assert_array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]


def test_metadata_is_json(mnist1d_cache):
    bundle = load_dataset("mnist1d", mnist1d_cache, label_noise=0.2)
    assert json.loads(json.dumps(bundle.metadata)) == bundle.metadata


# ---------------------------------------------------------------- augmentation


def test_random_crop_flip_returns_a_crop_of_the_padded_image():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = F.pad(images, (4, 4, 4, 4))
    for k in range(16):
        candidates = [
            view
            for dy in range(9)
            for dx in range(9)
            for view in (padded[k, :, dy : dy + 32, dx : dx + 32],)
            for view in (view, view.flip(-1))
        ]
        assert any(torch.equal(out[k], v) for v in candidates)
    assert not torch.equal(out, images)  # 16 identity draws have probability (1/162)^16


def test_cifar_augmentation_only_on_training_items(tmp_path):
    write_cifar10(tmp_path, per_batch=4, num_test=6)
    bundle = load_dataset("cifar10", tmp_path, val_fraction=0.25)
    train_draws = torch.stack([bundle.train[0][0] for _ in range(20)])
    assert train_draws.shape == (20, 3, 32, 32)
    assert not torch.equal(train_draws.amin(0), train_draws.amax(0))
    for split in (bundle.test, bundle.val):
        first, second = stacked(split)[0], stacked(split)[0]
        assert torch.equal(first, second)
    plain = load_dataset("cifar10", tmp_path, augment=False)
    assert plain.metadata["augment"] is False
    assert torch.equal(stacked(plain.train)[0], stacked(plain.train)[0])


def test_no_augmentation_outside_cifar(mnist1d_cache):
    bundle = load_dataset("mnist1d", mnist1d_cache, augment=True)
    assert bundle.metadata["augment"] is False
    assert torch.equal(bundle.train[7][0], bundle.train.inputs[7])


# ---------------------------------------------------------------- loaders


def test_batched_fetch_equals_item_fetch():
    bundle = load_dataset("digits")
    indices = [5, 0, 1436, 17]
    batch = bundle.train.__getitems__(indices)
    for (xb, yb), i in zip(batch, indices, strict=True):
        x, y = bundle.train[i]
        assert torch.equal(xb, x) and torch.equal(yb, y)


def test_make_loader_is_seeded_and_covers_the_set():
    bundle = load_dataset("digits")

    def targets(seed):
        return torch.cat([y for _, y in make_loader(bundle.train, 100, True, seed)])

    first = targets(0)
    assert torch.equal(first, targets(0))
    assert not torch.equal(first, targets(1))
    assert torch.equal(first.sort().values, bundle.train.targets.sort().values)
    batches = list(make_loader(bundle.train, 100, False, 0, drop_last=True))
    assert len(batches) == 1437 // 100
    x, y = batches[0]
    assert x.shape == (100, 1, 8, 8) and y.dtype == torch.int64
    assert torch.equal(y, bundle.train.targets[:100])


def test_make_loader_refuses_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(load_dataset("digits").train, 0, True, 0)
