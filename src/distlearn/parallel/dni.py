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
256-unit hidden layer per stage, with batch normalisation under ``--dni-batch-norm``; ``lenet``: cut into up
to 4 stages), stages, cdni, epochs/steps,
batch size, lr (Adam, default 3e-4), seed, train/test samples, data root, out, log_every and
comm_timeout. Other settings of the synthetic-gradient models (their width and rate, the lag bound,
model-parallel backprop instead of DNI) are flags of ``python -m distlearn.dni.cli``. Not supported here:
other optimizers than Adam, checkpoints and resume, LR schedules, gradient clipping, augmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from distlearn.dni.pipeline import DNIConfig, run_pipeline
from distlearn.errors import ConfigError
from distlearn.launch import init_distributed, shutdown
from distlearn.parallel.base import Strategy, StrategyOptions

__all__ = ["DNIOptions", "DecoupledStages", "dni_config_of"]


@dataclass
class DNIOptions(StrategyOptions):
    """Options of decoupled neural interfaces across processes (``--strategy dni``)."""

    stages: int = 0
    """cut the model into K stages, one process each (--workers = K)"""
    cdni: bool = False
    """condition the synthetic gradients on the label (cDNI)"""
    dni_batch_norm: bool = False
    """mlp only: batch normalisation between each hidden layer's linear map and its ReLU (the paper's
    FCN); each stage keeps its statistics, evaluation uses the running ones"""

    aliases: ClassVar[dict[str, str]] = {**StrategyOptions.aliases, "batch_norm": "dni_batch_norm"}

    def check(self, run: Any) -> None:
        super().check(run)
        dni_config_of(run, self)

    def cuda_refusal(self) -> str:
        return (
            "the DNI pipeline's stages run on the CPU and pass activations and gradients as CPU tensors "
            "over gloo point-to-point; use --device cpu (or auto)"
        )

    def batch_takers(self, processes: int) -> int:
        """1: every stage works on the whole batch."""
        return 1

    def idle_ranks(self, processes: int) -> tuple[int, ...]:
        return tuple(range(processes))  # the stages run their own loop (distlearn.dni), not the trainer's


def dni_config_of(config: Any, options: DNIOptions | None = None) -> DNIConfig:
    """The :class:`~distlearn.dni.pipeline.DNIConfig` of a run's config and its DNI options."""
    options = options if options is not None else config.options
    if config.optimizer != "adam":
        raise ConfigError(
            f"--strategy dni trains every stage and synthetic-gradient model with Adam (as the paper); "
            f"drop --optimizer {config.optimizer}"
        )
    if config.model not in ("mlp", "lenet", "resnet8"):
        raise ConfigError(f"--strategy dni cuts mlp, lenet or resnet8 into stages, not {config.model}")
    if options.dni_batch_norm and config.model != "mlp":
        raise ConfigError(
            f"--dni-batch-norm is an option of the mlp FCN only (lenet has no batch norm, resnet8 has its "
            f"own), not of --model {config.model}; drop --dni-batch-norm"
        )
    if options.stages < 2:
        raise ConfigError("--strategy dni needs --stages K with K >= 2 (one process per stage)")
    if config.workers not in (1, options.stages):
        raise ConfigError(
            f"--strategy dni runs one process per stage: --workers {config.workers} but --stages "
            f"{options.stages}; drop --workers"
        )
    for name, bad in (
        ("resume", config.resume is not None),
        ("clip-grad-norm", config.clip_grad_norm is not None),
        ("schedule", config.schedule != "constant" or config.warmup_steps),
        ("augment", bool(config.augment)),
    ):
        if bad:
            raise ConfigError(f"--strategy dni does not support --{name}; drop it")
    dni = DNIConfig(
        dataset=config.dataset, model=config.model, stages=options.stages, mode="dni", cdni=options.cdni,
        batch_norm=options.dni_batch_norm,
        epochs=config.epochs, steps=config.steps, batch_size=config.batch_size,
        seed=config.seed, train_samples=config.train_samples, test_samples=config.test_samples,
        data_root=config.data_root, out=config.out, log_every=config.log_every,
        timeout_s=options.comm_timeout, quiet=config.quiet, threads=config.threads or 1,
    )  # fmt: skip
    if config.lr is not None:
        dni = dataclasses.replace(dni, lr=config.lr)
    dni.validate()
    return dni


class DecoupledStages(Strategy):
    """Every rank runs one stage of a DNI pipeline (see the module docstring).

    Options: :class:`DNIOptions`; ``run`` (the trainer's config) gives the data, model and budget.
    """

    name = "dni"
    Options = DNIOptions
    amp_modes = ("none",)  # its stages train in their own loop (distlearn.dni), not the trainer's

    def __init__(self, options: DNIOptions | None = None, /, *, run: Any = None, **fields: Any) -> None:
        super().__init__(options, run=run, **fields)
        if run is None:
            raise ConfigError("the dni strategy needs the run's config: create_strategy('dni', run=config)")
        self.dni_config = dni_config_of(run, self.options)
        self.role = "stage"
        self.summary: dict[str, Any] = {}
        self._owns_group = False

    @classmethod
    def processes(cls, options: DNIOptions, run: Any) -> int:
        """One process per stage, whatever ``--workers`` says (1 or the number of stages)."""
        return options.stages

    def setup(self, seed: int) -> None:
        import torch.distributed as dist

        self._owns_group = not dist.is_initialized()
        context = init_distributed(timeout_s=self.dni_config.timeout_s)
        self.rank, self.world_size = context.rank, context.world_size
        self.check_same_options()

    def serve(self) -> None:
        self.summary = run_pipeline(self.dni_config, rank=self.rank, world_size=self.world_size)

    def close(self) -> None:
        if self._owns_group:
            shutdown()
            self._owns_group = False

    def describe(self) -> str:
        kind = "cDNI" if self.dni_config.cdni else "DNI"
        return f"dni ({kind}, {self.dni_config.stages} stages; rank {self.rank} runs stage {self.rank})"
