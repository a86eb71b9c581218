"""Small synthetic image classification data for the trainer tests (seconds, not minutes), and ``cli``:
the command line run in the test's process, its output as a process of its own would show it."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import pytest
import torch


@dataclass
class SyntheticImages:
    """The fields of distlearn.data.ArrayDataset the trainer reads: uint8 images, labels, classes, stats."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    name: str = "synthetic"
    source: str = "generated in tests/train/conftest.py"
    note: str | None = None
    extra: dict = field(default_factory=dict)


def make_synthetic(
    n: int, *, seed: int, classes: int = 4, channels: int = 1, side: int = 12
) -> SyntheticImages:
    """Each class is a fixed random prototype image; examples are the prototype plus uniform noise."""
    prototypes = torch.randint(
        0, 256, (classes, channels, side, side), generator=torch.Generator().manual_seed(123)
    )
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    noise = torch.randint(-90, 91, (n, channels, side, side), generator=generator)
    images = (prototypes[labels].long() + noise).clamp(0, 255).to(torch.uint8)
    scaled = images.float() / 255
    mean = scaled.mean(dim=(0, 2, 3)).tolist()
    std = scaled.std(dim=(0, 2, 3)).tolist()
    return SyntheticImages(images, labels, [f"class{i}" for i in range(classes)], mean, std)


@pytest.fixture(scope="session")
def synthetic() -> tuple[SyntheticImages, SyntheticImages]:
    """(train, test): 384 and 128 grey 12x12 images of 4 classes."""
    return make_synthetic(384, seed=1), make_synthetic(128, seed=2)


@dataclass
class Done:
    """What the command line left: its exit status and its output, as subprocess.run reports them."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, caplog, monkeypatch):
    """``distlearn ARGV`` run in this process, as ``python -m distlearn`` runs it: its exit status and output.

    A parse error of tyro's ends in SystemExit, whose code is the status, as the process would exit with.
    What a process of its own would also have printed on stderr is added to ``stderr``: the warnings its
    default filters show, and log records of level WARNING and above (pytest's handlers take them here), so
    "one line on stderr" is checked as strictly as on the command's own stderr.
    """
    monkeypatch.setenv("COLUMNS", "200")  # tyro's message box one line wide, as in a wide terminal

    from distlearn.cli import main

    def run(*argv: str) -> Done:
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING):
            warnings.resetwarnings()  # Python's default filters, as in a fresh interpreter
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            caplog.clear()
            try:
                code = main(list(argv))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
        captured = capsys.readouterr()
        extra = [f"{w.category.__name__}: {w.message}\n" for w in shown]
        extra += [f"{r.levelname}: {r.getMessage()}\n" for r in logged]
        return Done(code, captured.out, captured.err + "".join(extra))

    return run
