"""``--strategy dni``: decoupled neural interfaces, one stage of the model per process (model parallelism).

    distlearn train --dataset mnist --data-root ../shared/data --model mlp --strategy dni --stages 3 [--cdni]

Unlike the data-parallel strategies, no process holds the whole model or runs the trainer's loop: stage
``k`` lives on rank ``k``, activations travel up and gradients down (see :mod:`distlearn.dni.pipeline`
for the algorithm, Jaderberg et al. 2016 and Czarnecki et al. 2017). So every rank is a non-training role
for the trainer (``trains`` is false) whose :meth:`serve` runs its stage; rank 0 evaluates the assembled
network and writes ``OUT/metrics.jsonl`` (eval records, and a summary with the test accuracy, throughput
and each stage's utilisation), the top rank writes the training records. ``--workers`` defaults to
``--stages`` (:func:`launch_stages`).

From :class:`~distlearn.train.TrainConfig` it takes dataset, model (``mlp``: the paper's FCN with one
256-unit hidden layer per stage; ``lenet``: cut into up to 4 stages), stages, cdni, epochs/steps,
batch size, lr (Adam, default 3e-4), seed, train/test samples, data root, out, log_every and
comm_timeout. Other settings of the synthetic-gradient models (their width and rate, the lag bound,
model-parallel backprop instead of DNI) are flags of ``python -m distlearn.dni.cli``. Not supported here:
other optimizers than Adam, checkpoints and resume, LR schedules, gradient clipping, augmentation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distlearn.errors import ConfigError
from distlearn.launch import init_distributed, shutdown
from distlearn.parallel.base import Strategy

__all__ = ["DecoupledStages", "dni_config_of", "launch_stages"]


def dni_config_of(config: Any) -> Any:
    """The :class:`~distlearn.dni.pipeline.DNIConfig` of a :class:`~distlearn.train.TrainConfig`."""
    from distlearn.dni.pipeline import DNIConfig

    if config.optimizer != "adam":
        raise ConfigError(
            f"--strategy dni trains every stage and synthetic-gradient model with Adam (as the paper); "
            f"drop --optimizer {config.optimizer}"
        )
    if config.model not in ("mlp", "lenet", "resnet8"):
        raise ConfigError(f"--strategy dni cuts mlp, lenet or resnet8 into stages, not {config.model}")
    if config.stages < 2:
        raise ConfigError("--strategy dni needs --stages K with K >= 2 (one process per stage)")
    for flag, bad in (
        ("resume", config.resume is not None),
        ("clip-grad-norm", config.clip_grad_norm is not None),
        ("schedule", config.schedule != "constant" or config.warmup_steps),
        ("augment", bool(config.augment)),
    ):
        if bad:
            raise ConfigError(f"--strategy dni does not support --{flag}; drop it")
    dni = DNIConfig(
        dataset=config.dataset, model=config.model, stages=config.stages, mode="dni", cdni=config.cdni,
        epochs=config.epochs, steps=config.steps, batch_size=config.batch_size,
        seed=config.seed, train_samples=config.train_samples, test_samples=config.test_samples,
        data_root=config.data_root, out=config.out, log_every=config.log_every,
        timeout_s=config.comm_timeout, quiet=config.quiet, threads=config.threads or 1,
    )  # fmt: skip
    if config.lr is not None:
        dni = dataclasses.replace(dni, lr=config.lr)
    dni.validate()
    return dni


def launch_stages(config: Any) -> int:
    """Start one process per stage under torchrun on 127.0.0.1 (``--workers`` must be 1 or ``--stages``)."""
    from distlearn.train_cli import launch_workers

    dni_config_of(config)  # refuse bad settings before starting anything
    if config.workers not in (1, config.stages):
        raise ConfigError(
            f"--strategy dni runs one process per stage: --workers {config.workers} but --stages "
            f"{config.stages}; drop --workers"
        )
    return launch_workers(dataclasses.replace(config, workers=config.stages))


class DecoupledStages(Strategy):
    """Every rank runs one stage of a DNI pipeline (see the module docstring)."""

    name = "dni"

    def __init__(self, dni_config: Any) -> None:
        super().__init__()
        self.dni_config = dni_config
        self.role = "stage"
        self.summary: dict[str, Any] = {}
        self._owns_group = False

    @classmethod
    def from_config(cls, config: Any) -> DecoupledStages:
        return cls(dni_config_of(config))

    def setup(self, seed: int) -> None:
        import torch.distributed as dist

        self._owns_group = not dist.is_initialized()
        context = init_distributed(timeout_s=self.dni_config.timeout_s)
        self.rank, self.world_size = context.rank, context.world_size

    def serve(self) -> None:
        from distlearn.dni.pipeline import run_pipeline

        self.summary = run_pipeline(self.dni_config, rank=self.rank, world_size=self.world_size)

    def close(self) -> None:
        if self._owns_group:
            shutdown()
            self._owns_group = False

    def describe(self) -> str:
        kind = "cDNI" if self.dni_config.cdni else "DNI"
        return f"dni ({kind}, {self.dni_config.stages} stages; rank {self.rank} runs stage {self.rank})"
