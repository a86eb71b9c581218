"""CIFAR-10's three distributions, built small here: python batches, binary batches, a JPEG zip."""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from distlearn.data import cifar, load_dataset
from distlearn.data.cifar import CLASSES, read_jpeg_zip
from distlearn.errors import DataError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def images_and_labels(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def jpeg_zip(path, counts=(("train", 6), ("test", 4))):
    """A small cifar10-jpg.zip: image i of a split is a flat grey of 40 * i (flat colours survive JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for split, n in counts:
            for i in range(n):
                buffer = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(
                    buffer, format="JPEG", quality=95
                )
                archive.writestr(f"{split}/{CLASSES[i]}/{i:04d}.jpg", buffer.getvalue())
    return path


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
    jpeg_zip(source / "cifar10-jpg.zip")
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


def test_the_jpeg_cache_is_named_by_content_so_a_touched_zip_is_not_decoded_again(tmp_path, monkeypatch):
    zip_path = jpeg_zip(tmp_path / "cifar10-jpg.zip")
    first = read_jpeg_zip(zip_path, "test", tmp_path / "cache", progress=False)
    stamp = zip_path.stat().st_mtime + 3600  # a re-mount or a copy gives the same bytes a new mtime
    os.utime(zip_path, (stamp, stamp))

    def decode_again(*args):
        raise AssertionError("the zip was decoded again though its bytes had not changed")

    monkeypatch.setattr(cifar, "_decode", decode_again)
    again = read_jpeg_zip(zip_path, "test", tmp_path / "cache", progress=False)
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
    assert len(list(tmp_path.glob("*.npz"))) == 1


def _build_at_the_same_time(zip_path, barrier, results):
    real_replace = os.replace

    def replace_together(src, dst):  # every builder has saved its file before any renames
        barrier.wait(timeout=60)
        real_replace(src, dst)

    os.replace = replace_together
    try:
        images, _ = read_jpeg_zip(zip_path, "test", zip_path.parent / "cache", progress=False)
        results.put(("ok", images.shape))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("error", repr(error)))


def test_two_processes_building_the_jpeg_cache_at_once_both_succeed(tmp_path):
    """Every rank of a first run decodes the zip; they used to share one partial file, and the second
    rename failed with FileNotFoundError (seen in a cifar10 bench run)."""
    zip_path = jpeg_zip(tmp_path / "cifar10-jpg.zip")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    builders = [
        context.Process(target=_build_at_the_same_time, args=(zip_path, barrier, results)) for _ in range(2)
    ]
    for builder in builders:
        builder.start()
    outcomes = [results.get(timeout=120) for _ in builders]
    for builder in builders:
        builder.join(timeout=60)
    assert outcomes == [("ok", (4, 3, 32, 32))] * 2
    assert [p.name for p in tmp_path.iterdir() if "part" in p.name] == []
    with np.load(next(tmp_path.glob("cifar10-jpg-test-*.npz"))) as cached:
        assert cached["images"].shape == (4, 3, 32, 32)
