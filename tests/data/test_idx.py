"""IDX reading and the dataset resolution, on small files made here and on the real files where present."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from distlearn.data import MNIST_SPLIT, find_dataset, load_dataset
from distlearn.data.idx import read_idx, write_idx
from distlearn.errors import DataError


def small_idx_set(directory, *, train=True, n_train=30, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {"t10k": n_test} | ({"train": n_train} if train else {})
    for prefix, n in splits.items():
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        )
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return directory


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_gzip_and_raw(tmp_path, suffix):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / f"x{suffix}", array)
    assert np.array_equal(read_idx(tmp_path / f"x{suffix}", dimensions=3), array)


def test_wrong_magic_truncated_and_damaged_files_are_named(tmp_path):
    labels = tmp_path / "labels"
    write_idx(labels, np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match=r"magic number 0x00000801, expected 0x00000803.*images vs labels"):
        read_idx(labels, dimensions=3)
    images = tmp_path / "images"
    write_idx(images, np.zeros((4, 2, 2), dtype=np.uint8))
    images.write_bytes(images.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"images is truncated: its header announces \(4, 2, 2\)"):
        read_idx(images, dimensions=3)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="shorter than the 16-byte IDX header"):
        read_idx(tiny, dimensions=3)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000))[:2000])
    with pytest.raises(DataError, match="damaged gzip file"):
        read_idx(broken, dimensions=1)


def test_a_local_directory_gives_both_splits_with_training_statistics(tmp_path):
    root = small_idx_set(tmp_path / "fashion-mnist")
    train = load_dataset("fashion-mnist", "train", root=tmp_path, download=False)
    test = load_dataset("fashion-mnist", "test", root=tmp_path, download=False)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (12, 1, 28, 28) and test.labels.dtype == torch.int64
    expected_mean = train.images.double().div(255).mean().item()
    assert (
        train.mean == pytest.approx([expected_mean]) and test.mean == train.mean
    )  # train statistics for both
    assert train.classes[0] == "T-shirt/top" and train.source == str(root) and train.note is None


def test_mismatched_image_and_label_counts_are_an_error(tmp_path):
    root = small_idx_set(tmp_path)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8))
    with pytest.raises(DataError, match="30 images but .* 29 labels"):
        load_dataset("fashion-mnist", "train", root=root, download=False)


def test_mnist_test_set_alone_gives_a_seeded_disjoint_split_with_a_note(tmp_path):
    small_idx_set(tmp_path / "mnist", train=False, n_test=10_000)
    train = load_dataset("mnist", "train", root=tmp_path, download=False)
    test = load_dataset("mnist", "test", root=tmp_path, download=False)
    assert len(train) == MNIST_SPLIT["train"] and len(test) == MNIST_SPLIT["test"]
    assert "seeded split" in train.note and train.note == test.note
    rows = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in rows for x in test.images)  # disjoint (random images are distinct)
    again = load_dataset("mnist", "train", root=tmp_path, download=False)
    assert torch.equal(again.images, train.images)


def test_resolution_order_explicit_root_then_env_then_system(tmp_path, monkeypatch):
    first, second = small_idx_set(tmp_path / "a" / "fashion-mnist"), small_idx_set(tmp_path / "b", seed=1)
    monkeypatch.setenv("DISTLEARN_DATA", str(tmp_path / "b"))
    monkeypatch.setenv("DISTLEARN_CACHE", str(tmp_path / "cache"))
    assert find_dataset("fashion-mnist") == (second, "full")
    assert find_dataset("fashion-mnist", tmp_path / "a") == (first, "full")
    with pytest.raises(DataError, match=r"no mnist data in .*apt-get|no mnist data in .*DISTLEARN_DATA"):
        load_dataset("mnist", "train", root=tmp_path / "a")
    monkeypatch.delenv("DISTLEARN_DATA")
    with pytest.raises(DataError, match=r"no mnist data found \(looked in \$DISTLEARN_DATA \(unset\)"):
        load_dataset("mnist", "train", download=False)


def test_unknown_names_are_config_errors():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("mnist", "validation")


def test_real_mnist_test_set_from_shared_data(shared_data):
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"no MNIST test set at {shared_data}/mnist")
    train = load_dataset("mnist", "train", root=shared_data, download=False)
    assert train.images.shape == (8000, 1, 28, 28) and "seeded split" in train.note
    assert 0.12 < train.mean[0] < 0.14  # MNIST's well-known mean pixel, 0.1307 on the full training set
