"""The single-process strategy: one replica, ``R = 1``, every hook the identity.

This is plain mini-batch SGD (the overview's section 2 baseline) run through the same loop that every
distributed strategy uses; it is the reference the distributed strategies are measured against.
"""

from __future__ import annotations

from distlearn.parallel.base import Strategy

__all__ = ["SingleProcess"]


class SingleProcess(Strategy):
    """One process, rank 0 of 1, role ``"worker"``; the global batch is the local batch.

    Example::

        from distlearn.train import TrainConfig, train
        result = train(TrainConfig(dataset="fashion-mnist", model="lenet"), strategy=SingleProcess())
    """

    name = "single"

    def describe(self) -> str:
        return "single process"
