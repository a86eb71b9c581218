"""The run's state: its position (what a checkpoint resumes), every RNG state, and the checkpoint itself.

A :class:`RunState` replaces the loop's loose counters: the epoch and step, the samples seen, the wall
clock of the run so far, the best accuracy and each finished epoch's training seconds. A checkpoint holds
it (``position``) beside the model, optimizer, scheduler and strategy states and every RNG state, so a run
resumed from any checkpoint -- mid-epoch included -- ends with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distlearn.checkpoint import global_rng_state, set_global_rng_state
from distlearn.devices import cuda_rng_state, deterministic_settings, set_cuda_rng_state, to_host
from distlearn.errors import ConfigError

__all__ = ["RunState", "check_resume", "rng_state", "seed_everything", "set_rng_state", "torch_settings"]


@dataclass
class RunState:
    """Where the run is. ``wall_time`` is the run's clock before this process (resumed runs continue it)."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    samples: int = 0
    wall_time: float = 0.0
    best_accuracy: float = -1.0
    seconds_per_epoch: list[float] = field(default_factory=list)

    def position(self, wall_time: float, epoch_complete: bool) -> dict[str, Any]:
        """The checkpoint's ``position`` entry (the keys every earlier checkpoint has)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "samples": self.samples,
            "wall_time": wall_time,
            "epoch_complete": epoch_complete,
            "best_accuracy": self.best_accuracy,
            "seconds_per_epoch": list(self.seconds_per_epoch),
        }

    @classmethod
    def from_position(cls, position: dict[str, Any]) -> RunState:
        state = cls(
            epoch=position["epoch"],
            step_in_epoch=position["step_in_epoch"],
            step=position["step"],
            samples=position["samples"],
            wall_time=position["wall_time"],
            best_accuracy=position["best_accuracy"],
            seconds_per_epoch=list(position["seconds_per_epoch"]),
        )
        if position["epoch_complete"]:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(augment_generator: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG state of the run; on a CUDA ``device`` also its generator's (``"cuda"``)."""
    state = {**global_rng_state(), "augment": augment_generator.get_state()}
    cuda = cuda_rng_state(device) if device is not None else None
    return state if cuda is None else {**state, "cuda": cuda}


def set_rng_state(
    state: dict[str, Any], augment_generator: torch.Generator, device: torch.device | None = None
) -> None:
    """Restore :func:`rng_state` (loaded onto any device: generator states are CPU tensors again here)."""
    state = to_host(state)
    set_global_rng_state(state)
    augment_generator.set_state(state["augment"])
    if device is not None:
        set_cuda_rng_state(state.get("cuda"), device)


_MUST_MATCH = (
    "dataset",
    "model",
    "optimizer",
    "optimizer_option",
    "batch_size",
    "seed",
    "strategy",
    "train_samples",
)


def check_resume(config: Any, saved: dict[str, Any]) -> None:
    """A checkpoint continues only the run it came from: the settings that shape the state must match."""
    for key in _MUST_MATCH:
        now, then = getattr(config, key), saved.get(key)
        if isinstance(then, list):
            then = tuple(then)
        if now != then:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"--resume: the checkpoint was written with {flag} {then!r} but this run has {now!r}; "
                f"pass {flag} {then!r} to continue it, or drop --resume to start afresh"
            )


@contextlib.contextmanager
def torch_settings(config: Any, device: torch.device | None = None) -> Iterator[None]:
    """Deterministic algorithms (on ``device``: :func:`distlearn.devices.deterministic_settings`) and the
    thread count for the run; the previous settings come back after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    deterministic_settings(config.deterministic, device if device is not None else torch.device("cpu"))
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)
