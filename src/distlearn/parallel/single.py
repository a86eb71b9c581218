"""The single-process strategy: one replica, ``R = 1``, every hook the identity.

This is plain mini-batch SGD (the overview's section 2 baseline) run through the same loop that every
distributed strategy uses; it is the reference the distributed strategies are measured against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from distlearn.errors import ConfigError
from distlearn.launch import in_torchrun
from distlearn.parallel.base import Strategy, StrategyOptions

__all__ = ["SingleOptions", "SingleProcess"]


@dataclass
class SingleOptions(StrategyOptions):
    """One process has nothing to combine: only the common options."""

    def check(self, run: Any) -> None:
        super().check(run)
        if run.workers != 1:
            raise ConfigError(
                f"--workers {run.workers} needs a distributed strategy; add e.g. --strategy sync"
            )
        if in_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "started by torchrun with several processes but --strategy single; every process would "
                "train alone and write the same run directory -- pass e.g. --strategy sync"
            )


class SingleProcess(Strategy):
    """One process, rank 0 of 1, role ``"worker"``; the global batch is the local batch.

    Example::

        from distlearn.train import TrainConfig, train
        result = train(TrainConfig(dataset="fashion-mnist", model="lenet"), strategy=SingleProcess())
    """

    name = "single"
    Options = SingleOptions

    def describe(self) -> str:
        return "single process"
