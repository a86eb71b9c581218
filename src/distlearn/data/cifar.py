"""CIFAR-10 (Krizhevsky, 2009) from any of its three distributions, as uint8 arrays (N, 3, 32, 32).

* the original python batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``), read with a
  restricted unpickler that builds only dicts, lists, strings, bytes and numbers (no arbitrary code);
* the original binary batches (``cifar-10-batches-bin/data_batch_1..5.bin``, ``test_batch.bin``): records
  of 1 label byte and 3,072 pixel bytes;
* a zip of one JPEG per image, ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg`` (the form in
  ``../shared/data/cifar10``). Decoding 60,000 JPEGs with Pillow takes a while, so each split is decoded
  once and cached as ``.npz`` next to the zip (or in the cache directory when that is read-only), named
  by the zip's SHA-256; the JPEGs are lossy re-encodings, so accuracies can differ
  slightly from the original batches.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from distlearn.errors import DataError, require_extra

__all__ = ["CLASSES", "read_binary_batches", "read_jpeg_zip", "read_python_batches"]

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_UNREADABLE = (OSError, KeyError, ValueError, zipfile.BadZipFile)  # a damaged .npz cache raises one of these
_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Builds plain data and numpy arrays only; any other global in the pickle is refused."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}; only plain data is accepted")


def read_python_batches(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in _FILES[split]:
        path = directory / name
        try:
            with open(path, "rb") as handle:
                batch = _SafeUnpickler(handle, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(
                f"CIFAR-10 python batch {path} is missing; the directory must hold {_FILES[split]}"
            ) from None
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{path} is not a readable CIFAR-10 python batch ({error}); delete the directory and "
                "extract cifar-10-python.tar.gz again"
            ) from error
        if data.size % 3072:
            raise DataError(
                f"{path}: {data.size:,} pixel bytes are not whole 32x32x3 images; extract it again"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_binary_batches(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in _FILES[split]:
        path = directory / f"{name}.bin"
        if not path.is_file():
            raise DataError(f"CIFAR-10 binary batch {path} is missing; extract cifar-10-binary.tar.gz again")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise DataError(
                f"{path} holds {raw.size:,} bytes, not a whole number of 3,073-byte records; it is "
                "truncated or damaged: extract it again"
            )
        records = raw.reshape(-1, 3073)
        if records[:, 0].max() > 9:
            raise DataError(f"{path} has labels above 9; it is not a CIFAR-10 binary batch")
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def read_jpeg_zip(
    path: Path, split: str, cache_dir: Path, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the ``split`` JPEGs of the zip once; later calls read the cached arrays.

    The cache is named by the zip's SHA-256, not its modification time: a copy, a re-mount or a
    ``touch`` of the same bytes finds the same cache. Several processes may build it at once (every rank
    of a first run does): each writes its own partial file and renames it into place, and the rename is
    atomic, so a reader sees either no cache or a whole one.
    """
    from distlearn.data.download import file_digest

    digest = file_digest(path)
    name = f"{path.stem}-{split}-{digest[:16]}.npz"
    for candidate in (path.parent / name, cache_dir / name):
        if candidate.is_file():
            with contextlib.suppress(*_UNREADABLE), np.load(candidate) as cached:
                if str(cached["source_sha256"]) == digest:
                    return cached["images"], cached["labels"]
            with contextlib.suppress(OSError):  # a damaged or foreign cache is rebuilt, never trusted
                candidate.unlink(missing_ok=True)
    images, labels = _decode(path, split, progress)
    target_dir = path.parent if _writable(path.parent) else cache_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / name
    partial = target.with_name(f"{target.name}.{os.getpid()}.part.npz")  # one per process: no shared file
    try:
        np.savez(partial, images=images, labels=labels, source_sha256=np.array(digest))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return images, labels


def _writable(directory: Path) -> bool:
    """Writable for us and not marked read-only (root may write anywhere; r-x means 'keep out')."""
    return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


def _decode(path: Path, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    require_extra("PIL", "plot", "decoding CIFAR-10's JPEG zip (Pillow)")
    from PIL import Image, UnidentifiedImageError

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{path} is not a readable zip ({error}); copy it again") from error
    with archive:
        members = sorted(
            n
            for n in archive.namelist()
            if n.startswith(f"{split}/") and n.lower().endswith((".jpg", ".jpeg"))
        )
        if not members:
            raise DataError(f"{path} has no {split}/<class>/*.jpg images; is it the CIFAR-10 JPEG zip?")
        images = np.empty((len(members), 3, 32, 32), dtype=np.uint8)
        labels = np.empty(len(members), dtype=np.int64)
        bar = None
        if progress:
            from rich.progress import Progress

            bar = Progress(transient=True)
            bar.start()
            task = bar.add_task(f"decoding CIFAR-10 {split} JPEGs (once; cached)", total=len(members))
        try:
            for i, member in enumerate(members):
                class_name = member.split("/")[1]
                if class_name not in CLASSES:
                    raise DataError(f"{path}: {member} is in unknown class folder {class_name!r}")
                try:
                    with Image.open(io.BytesIO(archive.read(member))) as image:
                        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
                except (UnidentifiedImageError, OSError, zipfile.BadZipFile) as error:
                    raise DataError(
                        f"{path}: {member} is not a readable JPEG ({error}); copy the zip again"
                    ) from error
                if array.shape != (32, 32, 3):
                    raise DataError(f"{path}: {member} is {array.shape[1]}x{array.shape[0]}, expected 32x32")
                images[i] = array.transpose(2, 0, 1)
                labels[i] = CLASSES.index(class_name)
                if bar is not None and i % 500 == 0:
                    bar.update(task, completed=i)
        finally:
            if bar is not None:
                bar.stop()
    return images, labels
