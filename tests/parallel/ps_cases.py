"""Shared by the parameter-server tests and their worker processes: the run config (data: sync_cases)."""

from __future__ import annotations

from pathlib import Path

from distlearn.train import TrainConfig

GLOBAL_BATCH = 24  # divisible by R = 1, 2, 3
STEPS = 12
LR = 0.05


def ps_config(out: Path, *, optimizer: str = "sgd") -> TrainConfig:
    return TrainConfig.build(
        dataset="mnist",
        model="mlp",
        optimizer=optimizer,
        lr=LR,
        batch_size=GLOBAL_BATCH,
        steps=STEPS,
        augment=False,
        out=str(out),
        checkpoints=False,
        progress="off",
        tensorboard="off",
        quiet=True,
        log_every=4,
        threads=1,
    )
