"""Shared test set-up: deterministic, single-threaded torch so tests on 2 cores stay fast and repeatable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ]
)
def device(request) -> torch.device:
    """The test's device: the CPU, and CUDA where a GPU is visible (marked ``gpu``; skipped elsewhere)."""
    return torch.device(request.param)


@pytest.fixture
def shared_data() -> Path:
    """The read-only data directory beside the repository (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is not present on this machine")
    return SHARED_DATA
