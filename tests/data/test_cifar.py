"""CIFAR-10's three distributions, built small here: python batches, binary batches, a JPEG zip."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from distlearn.data import load_dataset
from distlearn.data.cifar import CLASSES
from distlearn.errors import DataError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def images_and_labels(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def test_python_batches(tmp_path):
    directory = tmp_path / "cifar10" / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    expected = {}
    for i, name in enumerate(BATCHES):
        images, labels = images_and_labels(4, i)
        expected[name] = (images, labels)
        batch = {b"data": images.reshape(4, -1), b"labels": labels.tolist(), b"batch_label": b"x"}
        (directory / name).write_bytes(pickle.dumps(batch))
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert np.array_equal(test.images.numpy(), expected["test_batch"][0])
    assert np.array_equal(train.labels.numpy()[:4], expected["data_batch_1"][1])
    assert train.classes == CLASSES


def test_python_batches_refuse_code_in_the_pickle(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for name in BATCHES:
        (directory / name).write_bytes(pickle.dumps({b"data": __import__("os").getcwd}))  # a function
    with pytest.raises(DataError, match="only plain data is accepted"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)


def test_binary_batches_and_a_truncated_one(tmp_path):
    directory = tmp_path / "cifar-10-batches-bin"
    directory.mkdir()
    for i, name in enumerate(BATCHES):
        images, labels = images_and_labels(3, i)
        records = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(3, -1)], axis=1)
        (directory / f"{name}.bin").write_bytes(records.tobytes())
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert np.array_equal(test.images.numpy(), images_and_labels(3, 5)[0])
    (directory / "data_batch_2.bin").write_bytes((directory / "data_batch_2.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match="not a whole number of 3,073-byte records"):
        load_dataset("cifar10", "train", root=tmp_path, download=False)


def test_jpeg_zip_is_decoded_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTLEARN_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "data" / "cifar10"
    source.mkdir(parents=True)
    with zipfile.ZipFile(source / "cifar10-jpg.zip", "w") as archive:
        for split, n in (("train", 6), ("test", 4)):
            for i in range(n):
                flat = np.full(
                    (32, 32, 3), 40 * i, dtype=np.uint8
                )  # flat colours survive JPEG nearly exactly
                buffer = io.BytesIO()
                Image.fromarray(flat).save(buffer, format="JPEG", quality=95)
                archive.writestr(f"{split}/{CLASSES[i]}/{i:04d}.jpg", buffer.getvalue())
    test = load_dataset("cifar10", "test", root=tmp_path / "data", download=False, progress=False)
    assert test.images.shape == (4, 3, 32, 32) and sorted(test.labels.tolist()) == [0, 1, 2, 3]
    assert abs(int(test.images[test.labels == 2].float().mean()) - 80) <= 2
    cached = list(source.glob("*.npz"))
    assert len(cached) == 2  # test split, and train for the statistics; next to the writable source
    again = load_dataset("cifar10", "test", root=tmp_path / "data", download=False, progress=False)
    assert np.array_equal(again.images.numpy(), test.images.numpy())
    source.chmod(0o555)  # a read-only source directory: the cache goes to DISTLEARN_CACHE instead
    try:
        for stale in cached:
            source.chmod(0o755)
            stale.unlink()
            source.chmod(0o555)
        load_dataset("cifar10", "test", root=tmp_path / "data", download=False, progress=False)
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
        assert not list(source.glob("*.npz"))
    finally:
        source.chmod(0o755)


def test_a_damaged_zip_is_an_error(tmp_path):
    (tmp_path / "cifar10-jpg.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        load_dataset("cifar10", "test", root=tmp_path, download=False, progress=False)
