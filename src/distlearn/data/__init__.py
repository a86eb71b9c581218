"""Datasets as tensors: MNIST, Fashion-MNIST and CIFAR-10, found locally or downloaded with checksums.

    from distlearn.data import load_dataset
    train = load_dataset("fashion-mnist", "train")        # ArrayDataset: images uint8 (N, C, H, W), labels
    test = load_dataset("cifar10", "test", root="../shared/data")

Where the files are looked for, in order (the first place that has them wins):

1. ``root=`` (``--data-root``) when given -- then only there, so a wrong path is an error, not a surprise;
2. the directory in the ``DISTLEARN_DATA`` environment variable;
3. known system locations: Debian's ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist);
4. the cache directory (``DISTLEARN_CACHE``, default ``~/.cache/distlearn``), downloading into it from the
   canonical URLs with checksum verification when ``download=True`` (see :mod:`distlearn.data.download`).

A directory "has" a dataset when it holds the files directly or in a sub-directory named after the dataset
(``mnist/``, ``fashion-mnist/``, ``cifar10/``). MNIST and Fashion-MNIST are IDX files, gzip or raw
(:mod:`distlearn.data.idx`); CIFAR-10 is any of its three distributions (:mod:`distlearn.data.cifar`).

MNIST offline: where a directory holds only MNIST's test set (t10k files, as ../shared/data/mnist does),
both splits come from it: a seeded split into 8,000 training and 2,000 test images (disjoint, the same on
every machine), and the dataset's ``note`` says so; the trainer prints and records that note.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distlearn.data.cifar import CLASSES as CIFAR10_CLASSES
from distlearn.data.cifar import read_binary_batches, read_jpeg_zip, read_python_batches
from distlearn.data.download import RemoteFile, download
from distlearn.data.idx import read_idx, read_idx_shape
from distlearn.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "MNIST_SPLIT",
    "ArrayDataset",
    "cache_dir",
    "check_dataset",
    "find_dataset",
    "load_dataset",
]

DATASETS = ("mnist", "fashion-mnist", "cifar10")
SYSTEM_LOCATIONS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}
MNIST_SPLIT = {"seed": 20160601, "train": 8000, "test": 2000}
"""How MNIST's 10,000 test images are split when they are all there is."""

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


# Checksums: SHA-256 where we have it (the MNIST test files' from ../shared/data/README.md), otherwise the
# publisher's MD5 (LeCun's MNIST files as listed by torchvision; Zalando's Fashion-MNIST README).
def _mnist(name: str, **checksum: str) -> RemoteFile:
    return RemoteFile(name, tuple(mirror + name for mirror in _MNIST_MIRRORS), **checksum)


def _fashion(name: str, md5: str) -> RemoteFile:
    return RemoteFile(name, (_FASHION_MIRROR + name,), md5=md5)


REMOTE_FILES: dict[str, list[RemoteFile]] = {
    "mnist": [
        _mnist("train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _mnist("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432"),
        _mnist(
            "t10k-images-idx3-ubyte.gz",
            sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        _mnist(
            "t10k-labels-idx1-ubyte.gz",
            sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ],
    "fashion-mnist": [
        _fashion("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        _fashion("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        _fashion("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        _fashion("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    "cifar10": [
        RemoteFile(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            md5="c58f30108f718f92721af3b95e74349a",
        )
    ],
}


@dataclass
class ArrayDataset:
    """A whole split in memory: ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,).

    ``mean`` and ``std`` are the per-channel statistics of the *training* split's ``images / 255`` (what
    the trainer normalises with); ``source`` says where the data came from and ``note`` anything a result
    must mention (the MNIST split).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    source: str
    note: str | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    """Where downloads and decoded caches go: ``DISTLEARN_CACHE`` or ``~/.cache/distlearn``."""
    return Path(os.environ.get("DISTLEARN_CACHE") or Path.home() / ".cache" / "distlearn")


def _idx_path(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _dataset_dirs(base: Path, name: str) -> list[Path]:
    aliases = {
        "fashion-mnist": ["fashion-mnist", "fashion_mnist", "FashionMNIST"],
        "cifar10": ["cifar10", "cifar-10"],
    }
    return [base, *(base / alias for alias in aliases.get(name, [name]))]


def _holds(directory: Path, name: str) -> str | None:
    """What form of dataset ``name`` ``directory`` holds: 'full', 'test-only', a CIFAR form, or None."""
    if not directory.is_dir():
        return None
    if name == "cifar10":
        if (directory / "cifar-10-batches-py" / "test_batch").is_file() or (
            directory / "test_batch"
        ).is_file():
            return "python"
        if (directory / "cifar-10-batches-bin" / "test_batch.bin").is_file() or (
            directory / "test_batch.bin"
        ).is_file():
            return "binary"
        if any(directory.glob("*.zip")) and (directory / "cifar10-jpg.zip").is_file():
            return "jpeg-zip"
        return None
    has = {split: all(_idx_path(directory, stem) for stem in stems) for split, stems in _IDX_FILES.items()}
    if has["train"] and has["test"]:
        return "full"
    if name == "mnist" and has["test"]:
        return "test-only"
    return None


def find_dataset(name: str, root: str | Path | None = None) -> tuple[Path, str] | None:
    """The first directory (in the resolution order) holding ``name``, and its form; None if none does."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if root is not None:
        bases = [Path(root)]
    else:
        bases = [Path(os.environ["DISTLEARN_DATA"])] if os.environ.get("DISTLEARN_DATA") else []
        bases += SYSTEM_LOCATIONS.get(name, []) + [cache_dir()]
    for base in bases:
        for directory in _dataset_dirs(base, name):
            form = _holds(directory, name)
            if form is not None:
                return directory, form
    return None


def load_dataset(
    name: str, split: str, *, root: str | Path | None = None, download: bool = True, progress: bool = True
) -> ArrayDataset:
    """Split ``split`` ("train" or "test") of dataset ``name``, resolved as the module docstring says."""
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'")
    found = find_dataset(name, root)
    if found is None:
        looked = _looked_in(name, root)
        if root is not None:
            raise DataError(f"no {name} data in {root} (looked in {looked}); {_how_to_get(name)}")
        if not download:
            raise DataError(f"no {name} data found (looked in {looked}); {_how_to_get(name)}")
        _download(name, progress)
        found = find_dataset(name, None)
        if found is None:  # pragma: no cover - a verified download always has the files
            raise DataError(f"{name}: the download in {cache_dir()} did not produce the expected files")
    directory, form = found
    if name == "cifar10":
        return _load_cifar(directory, form, split, progress)
    return _load_idx(name, directory, form, split)


def check_dataset(name: str, root: str | Path | None = None) -> None:
    """DataError now for what :func:`load_dataset` would refuse in the files' headers: a wrong magic number,
    dimensions that overflow or disagree with a raw file's size, images that are not 28x28, image and label
    counts that differ; and, with ``root``, no data there. Reads only the headers (a launcher's check)."""
    found = find_dataset(name, root)
    if found is None:
        if root is not None:
            looked = _looked_in(name, root)
            raise DataError(f"no {name} data in {root} (looked in {looked}); {_how_to_get(name)}")
        return  # the job's processes look further, and download
    directory, form = found
    if name == "cifar10":
        return
    for split in ("train", "test") if form == "full" else ("test",):
        image_path, label_path = (_idx_path(directory, stem) for stem in _IDX_FILES[split])
        assert image_path is not None and label_path is not None
        shape = read_idx_shape(image_path, dimensions=3)
        _check_image_size(image_path, shape)
        (labels,) = read_idx_shape(label_path, dimensions=1)
        _check_counts(image_path, shape[0], label_path, labels)


def _check_image_size(path: Path, shape: tuple[int, ...]) -> None:
    if tuple(shape[1:]) != (28, 28):
        raise DataError(
            f"{path} holds images of {shape[1]}x{shape[2]} pixels (shape {tuple(shape)}); MNIST and "
            "Fashion-MNIST images are 28x28: it is another dataset's file -- replace it, or give your own "
            "data as --dataset package.module:factory"
        )


def _check_counts(image_path: Path, images: int, label_path: Path, labels: int) -> None:
    if images != labels:
        raise DataError(
            f"{image_path} holds {images:,} images but {label_path} {labels:,} labels; "
            "one of them is from another set: replace both"
        )


def _looked_in(name: str, root: str | Path | None) -> str:
    if root is not None:
        return ", ".join(str(d) for d in _dataset_dirs(Path(root), name))
    bases = (
        [os.environ["DISTLEARN_DATA"]] if os.environ.get("DISTLEARN_DATA") else ["$DISTLEARN_DATA (unset)"]
    )
    bases += [str(p) for p in SYSTEM_LOCATIONS.get(name, [])] + [str(cache_dir())]
    return ", ".join(bases)


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return (
            "install it with `apt-get install -y dataset-fashion-mnist`, or set DISTLEARN_DATA / --data-root"
        )
    if name == "mnist":
        return "put the four IDX files (or t10k-* alone) there, or set DISTLEARN_DATA / --data-root"
    return "put cifar-10-batches-py/, cifar-10-batches-bin/ or cifar10-jpg.zip there, or set DISTLEARN_DATA"


def _download(name: str, progress: bool) -> None:
    target = cache_dir() / name
    files = [download(remote, target, progress=progress) for remote in REMOTE_FILES[name]]
    if name == "cifar10":
        try:
            with tarfile.open(files[0]) as archive:
                archive.extractall(target, filter="data")
        except (tarfile.TarError, OSError) as error:
            raise DataError(
                f"{files[0]} passed its checksum but does not extract ({error}); delete it"
            ) from error


def _statistics(images: np.ndarray) -> tuple[list[float], list[float]]:
    scaled = images.astype(np.float64) / 255.0
    return scaled.mean(axis=(0, 2, 3)).tolist(), scaled.std(axis=(0, 2, 3)).tolist()


def _read_idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _IDX_FILES[split]
    image_path, label_path = _idx_path(directory, image_stem), _idx_path(directory, label_stem)
    assert image_path is not None and label_path is not None
    images, labels = read_idx(image_path, dimensions=3), read_idx(label_path, dimensions=1)
    _check_image_size(image_path, images.shape)
    _check_counts(image_path, len(images), label_path, len(labels))
    if labels.max(initial=0) > 9:
        raise DataError(f"{label_path} has labels above 9; it is not an MNIST-style label file")
    return images[:, None], labels.astype(np.int64)


def _load_idx(name: str, directory: Path, form: str, split: str) -> ArrayDataset:
    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    note = None
    if form == "full":
        images, labels = _read_idx_split(directory, split)
        train_images = images if split == "train" else _read_idx_split(directory, "train")[0]
    else:  # MNIST's test set only: the seeded split
        all_images, all_labels = _read_idx_split(directory, "test")
        order = np.random.default_rng(MNIST_SPLIT["seed"]).permutation(len(all_labels))
        train_index = np.sort(order[: MNIST_SPLIT["train"]])
        test_index = np.sort(order[MNIST_SPLIT["train"] : MNIST_SPLIT["train"] + MNIST_SPLIT["test"]])
        index = train_index if split == "train" else test_index
        images, labels = all_images[index], all_labels[index]
        train_images = all_images[train_index]
        note = (
            f"MNIST training set not found in {directory}: using a seeded split of the 10,000-image "
            f"MNIST test set, {MNIST_SPLIT['train']:,} for training and {MNIST_SPLIT['test']:,} for testing "
            f"(seed {MNIST_SPLIT['seed']}); results are not comparable with the standard 60k/10k split"
        )
    mean, std = _statistics(train_images)
    return ArrayDataset(
        name=name,
        split=split,
        images=torch.from_numpy(np.array(images)),
        labels=torch.from_numpy(np.array(labels)),
        classes=classes,
        mean=mean,
        std=std,
        source=str(directory),
        note=note,
    )


def _load_cifar(directory: Path, form: str, split: str, progress: bool) -> ArrayDataset:
    def read(which: str) -> tuple[np.ndarray, np.ndarray]:
        if form == "python":
            base = directory / "cifar-10-batches-py"
            return read_python_batches(base if base.is_dir() else directory, which)
        if form == "binary":
            base = directory / "cifar-10-batches-bin"
            return read_binary_batches(base if base.is_dir() else directory, which)
        return read_jpeg_zip(directory / "cifar10-jpg.zip", which, cache_dir(), progress=progress)

    images, labels = read(split)
    train_images = images if split == "train" else read("train")[0]
    mean, std = _statistics(train_images)
    note = (
        "CIFAR-10 from lossy JPEG re-encodings; accuracies can differ slightly"
        if form == "jpeg-zip"
        else None
    )
    return ArrayDataset(
        name="cifar10",
        split=split,
        images=torch.from_numpy(np.array(images)),
        labels=torch.from_numpy(np.array(labels)),
        classes=list(CIFAR10_CLASSES),
        mean=mean,
        std=std,
        source=str(directory),
        note=note,
        extra={"form": form},
    )
