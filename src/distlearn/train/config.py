"""The run's config: the common options of every run, composed with the chosen strategy's options.

    config = TrainConfig(dataset="fashion-mnist", strategy="sync", options=SyncOptions(reducer="ring"))
    config = TrainConfig.build(dataset="fashion-mnist", strategy="sync", reducer="ring")   # the same

Each field of :class:`TrainConfig` is a ``distlearn train --flag`` and a top-level key of a config file;
the strategy's options (``SyncOptions``, ``PSOptions``, ... declared beside each strategy) are flags too
and, in a file, the keys of a table named after the strategy::

    dataset = "fashion-mnist"
    strategy = "sync"
    epochs = 2
    [sync]
    reducer = "ring"
    bucket_mb = 5

One merge rule: defaults < config file < flags (:func:`distlearn.train_cli.parse_config`). Every value is
checked once, when the config is built (:meth:`TrainConfig.validate` and the options' own ``validate``),
and the combinations with the strategy (its options' ``check``) by :func:`validate_config`, which the
command line runs before it starts any process.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from distlearn import optim
from distlearn.amp import check_amp, check_closure
from distlearn.config import from_dict, mapping_to_toml, parse_options, positive, read_file
from distlearn.devices import DEVICE_CHOICES, resolve_device
from distlearn.errors import ConfigError
from distlearn.launch import in_torchrun
from distlearn.models import MODELS
from distlearn.models.factory import is_import_path
from distlearn.parallel import STRATEGIES, strategy_class
from distlearn.parallel.base import make_options, option_names
from distlearn.train.straggler import check_stragglers

__all__ = [
    "TrainConfig",
    "config_from_dict",
    "config_to_toml",
    "job_processes",
    "load_config_file",
    "validate_config",
]

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10")
"""The built-in datasets; any other ``--dataset`` is an import path ``package.module:factory``."""


@dataclass
class TrainConfig:
    """Everything a training run needs: the common options, and ``options`` of the chosen strategy."""

    dataset: str = "fashion-mnist"
    """dataset to train and test on: mnist, fashion-mnist, cifar10, or your own as package.module:factory
    (factory() returns (train, test), each a torch Dataset of (x, y) items or a pair of tensors (x, y))"""
    model: str = "lenet"
    """network: mlp, lenet (28x28 inputs), resnet8/14/20 (CIFAR ResNets of He et al.), or your own as
    package.module:factory (factory() returns a torch.nn.Module)"""
    loss: str = "cross-entropy"
    """training and test loss: cross-entropy, or your own as package.module:name, a callable
    loss(outputs, targets) -> scalar tensor (e.g. torch.nn.functional:mse_loss)"""
    optimizer: str = "adam"
    """a distlearn.optim name (sgd, momentum, nesterov, adagrad, rmsprop, adadelta, adam, cg-fr, cg-hs) or
    torch-<name> for torch.optim.<Name> (torch-sgd, torch-adamw, ...)"""
    lr: float | None = None
    """peak learning rate (default: the optimizer's own default)"""
    optimizer_option: tuple[str, ...] = ()
    """extra optimizer hyper-parameters as KEY=VALUE, e.g. momentum=0.9 weight_decay=5e-4"""
    epochs: int = 2
    """passes over the training set"""
    steps: int | None = None
    """stop after this many optimizer steps in total (overrides --epochs)"""
    batch_size: int = 128
    """global batch B (each of R replicas sees B / R examples per step)"""
    eval_batch_size: int = 1000
    """batch size for test-set evaluation"""
    schedule: Literal["constant", "step", "cosine"] = "constant"
    """learning-rate schedule after the warm-up"""
    warmup_steps: int = 0
    """linear warm-up: step t < W uses lr * (t + 1) / W"""
    lr_decay_every: int = 0
    """step schedule: multiply the lr by --lr-decay-factor every N steps"""
    lr_decay_factor: float = 0.1
    """step schedule: factor per decay"""
    min_lr_factor: float = 0.0
    """cosine schedule: final lr as a fraction of the peak lr"""
    clip_grad_norm: float | None = None
    """clip the global gradient 2-norm to this value before each step"""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """mixed precision: forward and loss under torch.autocast in bf16, or in fp16 with loss scaling
    (torch.amp.GradScaler; steps with inf/NaN gradients are skipped on every replica); weights stay float32"""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """a non-finite loss or gradient: stop the run with an error naming the step (the last good checkpoint
    kept), or skip the step (no update; counted in the summary; 25 in a row stop the run)"""
    max_loss_factor: float = 1e4
    """stop the run when the mean training loss exceeds this many times the first step's loss (at least
    1.0): a finite divergence (0: never)"""
    augment: bool | None = None
    """random crop + horizontal flip on training batches (default: on for cifar10 only)"""
    train_samples: int | None = None
    """train on a seeded random subset of this many examples (quick runs)"""
    test_samples: int | None = None
    """evaluate on the first N test examples only (quick runs)"""
    data_root: str | None = None
    """dataset directory (default: DISTLEARN_DATA, system locations, cache)"""
    strategy: str = "single"
    """how replicas combine work: single, sync, ddp, ps, hogwild, local-sgd, easgd, dni (or your own as
    package.module:Class); each has its own options: distlearn train --strategy NAME --help"""
    workers: int = 1
    """processes on this machine (torchrun underneath); under torchrun: its world size"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where each process computes: cuda (GPU LOCAL_RANK of its machine: one GPU per process, NCCL between
    them), cpu (gloo), or auto (cuda where torch sees a GPU and the strategy can use it, else cpu); training
    data stays in host memory and each batch is copied over through pinned memory"""
    max_restarts: int = 0
    """after a worker fails, start the job's workers again up to N times (torchrun's restarts); each restart
    resumes from the newest checkpoint in OUT/checkpoints (see --checkpoint-every), or starts over if none"""
    seed: int = 0
    """seed for weights, data order, dropout and augmentation"""
    straggler: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """slow a rank down: RANK:DELAY_MS sleeps DELAY_MS at the start of each of that rank's steps; repeat the
    flag for more ranks, e.g. --straggler 1:50 --straggler 3:20 (see distlearn.train.straggler)"""
    straggler_dist: str = "none"
    """a random delay at the start of every training rank's steps, drawn per (seed, rank, step):
    exp:MEAN_MS, lognormal:MEDIAN_MS:SIGMA, uniform:LO_MS:HI_MS, or none"""
    straggler_sleep_scale: float = 1.0
    """sleep this many times each delay (the simulated clock still counts the delay once): on a machine
    with k processes per core, k keeps a straggler as far behind its peers in wall time as on the clock"""
    sim_clock: bool = False
    """keep the simulated clock (per step: CPU time + delay; a synchronous step lasts as long as its slowest
    replica) without stragglers; records then carry extra.sim_time_s (on whenever stragglers are given)"""
    deterministic: bool = True
    """use torch's deterministic algorithms (identical runs per seed)"""
    threads: int | None = None
    """torch intra-op threads (default: torch's)"""
    eval_every: int = 0
    """evaluate on the test set every N steps (0: at the end of each epoch)"""
    log_every: int = 50
    """write a training metrics record every N steps"""
    out: str = "runs/train"
    """run directory: metrics.jsonl, checkpoints/"""
    name: str | None = None
    """run name in the metrics (default: OUT's name)"""
    checkpoints: bool = True
    """write checkpoints to OUT/checkpoints (--no-checkpoints: none)"""
    checkpoint_every: int = 0
    """save a checkpoint every N steps (0: at the end of each epoch)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept on disk (>= 2)"""
    resume: str | None = None
    """checkpoint file, or directory (its newest), to resume from; its records after the checkpoint's step
    are dropped from OUT's metrics"""
    overwrite: bool = False
    """delete an earlier run's metrics, checkpoints and TensorBoard events in OUT first (without it, or
    --resume, an OUT holding a run is refused)"""
    progress: Literal["auto", "on", "off"] = "auto"
    """progress display: the bar on a terminal (auto: when stderr is one); plain lines when stdout is not
    a terminal (off: neither)"""
    progress_every: float = 5.0
    """seconds between the plain progress lines written when stdout is not a terminal"""
    tensorboard: Literal["auto", "on", "off"] = "auto"
    """TensorBoard events in OUT/tensorboard (auto: if installed)"""
    quiet: bool = False
    """no progress bar or lines while training (the summary at the end is still printed)"""
    options: Annotated[Any, tyro.conf.Suppress] = None
    """the strategy's options (an instance of its ``Options`` dataclass; None: its defaults)"""

    def __post_init__(self) -> None:
        self.validate()
        self.options = make_options(strategy_class(self.strategy).Options, self.options)

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """A config from flat keyword values: common fields and the strategy's option fields alike."""
        return config_from_dict(values, source="TrainConfig.build")

    def validate(self) -> None:
        """ConfigError for a value no run can use, naming the flag and the fix (the common options)."""
        for name in ("workers", "epochs", "batch_size", "eval_batch_size", "log_every"):
            positive(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "progress_every", "max_restarts") + (
            "max_loss_factor",
        ):
            positive(name, getattr(self, name), allow_zero=True)
        for name in ("steps", "lr", "clip_grad_norm", "train_samples", "test_samples", "threads"):
            positive(name, getattr(self, name), allow_none=True)
        if self.model not in MODELS and not is_import_path(self.model):
            raise ConfigError(
                f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}, "
                "or give your own as package.module:factory"
            )
        if self.dataset not in DATASET_NAMES and not is_import_path(self.dataset):
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASET_NAMES)}, "
                "or give your own as package.module:factory"
            )
        if self.loss != "cross-entropy" and not is_import_path(self.loss):
            raise ConfigError(
                f"unknown loss {self.loss!r}; use cross-entropy, or give your own as package.module:name"
            )
        if self.device not in DEVICE_CHOICES:
            raise ConfigError(f"--device {self.device!r}: choose one of {', '.join(DEVICE_CHOICES)}")
        if 0 < self.max_loss_factor <= 1:
            raise ConfigError(
                f"--max-loss-factor must be above 1 (or 0: no check), got {self.max_loss_factor}; e.g. 1e4"
            )
        if self.keep_checkpoints < 2:
            raise ConfigError(
                "--keep-checkpoints must be >= 2 so the previous good checkpoint survives, "
                f"got {self.keep_checkpoints}"
            )
        self._validate_schedule()
        self._validate_amp()
        if self.augment and self.dataset == "mnist":
            raise ConfigError(
                "--augment flips and shifts images, and a mirrored digit is a different digit; "
                "drop --augment for mnist (use it with cifar10 or fashion-mnist)"
            )
        if self.checkpoint_every and not self.checkpoints:
            raise ConfigError("--checkpoint-every needs checkpoints; drop --no-checkpoints")
        if self.train_samples is not None and self.train_samples < self.batch_size:
            raise ConfigError(
                f"--train-samples {self.train_samples} is smaller than --batch-size {self.batch_size}: "
                "no full batch; raise --train-samples or lower --batch-size"
            )
        parse_options(self.optimizer_option)

    def _validate_amp(self) -> None:
        check_amp(self.amp)
        modes = strategy_class(self.strategy).amp_modes
        if self.amp not in modes:
            raise ConfigError(
                f"--amp {self.amp} is not available with --strategy {self.strategy} (it supports --amp "
                f"{', '.join(modes)}); use --amp {modes[-1]}"
            )

    def _validate_schedule(self) -> None:
        if self.schedule == "step" and self.lr_decay_every < 1:
            raise ConfigError("--schedule step needs --lr-decay-every N (steps between decays), e.g. 1000")
        if self.schedule != "step" and self.lr_decay_every:
            raise ConfigError(
                f"--lr-decay-every only applies to --schedule step (got --schedule {self.schedule})"
            )
        if not 0 < self.lr_decay_factor <= 1:
            raise ConfigError(f"--lr-decay-factor must be in (0, 1], got {self.lr_decay_factor}")
        if not 0 <= self.min_lr_factor <= 1:
            raise ConfigError(f"--min-lr-factor must be in [0, 1], got {self.min_lr_factor}")
        if self.min_lr_factor and self.schedule != "cosine":
            raise ConfigError(
                f"--min-lr-factor only applies to --schedule cosine (got --schedule {self.schedule})"
            )


COMMON = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "options"]
"""The common options' names (every field but ``options``)."""


def validate_config(
    config: TrainConfig, *, check_optimizer: bool = True, check_strategy: bool = True
) -> None:
    """Check what needs the whole run: the optimizer, the resume path, and the strategy's combinations
    (its options' ``check``, and ``check_job`` with the job's size, :func:`job_processes`).

    ``check_optimizer=False`` skips the optimizer (the Python API was given an optimizer object);
    ``check_strategy=False`` skips the strategy options' ``check`` (a strategy object was given, or it is
    about to be built with ``run=config``, which checks them).
    """
    if check_optimizer and config.optimizer not in optim.optimizer_names():
        names = ", ".join(optim.optimizer_names())
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; choose one of: {names}")
    if config.resume is not None and not Path(config.resume).exists():
        raise ConfigError(
            f"--resume {config.resume}: no such file or directory; pass a checkpoint written by a run"
        )
    if check_optimizer:
        check_closure(config.amp, optim.needs_closure(config.optimizer))
    if check_optimizer and check_strategy:
        config.options.check(config)  # strategies that cannot use CUDA refuse --device cuda here
        config.options.check_job(config, job_processes(config))
    # here, not in validate(): the command line prints a ConfigError of validate_config in one line
    positive("straggler_sleep_scale", config.straggler_sleep_scale, allow_zero=True)
    processes = job_processes(config) if config.straggler else 1
    check_stragglers(config, processes, config.options.idle_ranks(processes))  # forms, delays, ranks
    if config.device == "cuda":
        resolve_device("cuda", 0)  # a ConfigError naming the fix where torch sees no CUDA device


def job_processes(config: TrainConfig) -> int:
    """The job's world size: torchrun's ``WORLD_SIZE`` inside it, else what the strategy will start
    (:meth:`~distlearn.parallel.base.Strategy.processes`: ``--workers``, DNI's stages)."""
    if in_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return strategy_class(config.strategy).processes(config.options, config)


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """A config from a mapping: common keys, the strategy's table (``{"sync": {...}}``) and flat option keys.

    A key of another strategy's options, or another strategy's table, is refused with the strategy it
    belongs to.
    """
    values = dict(values)
    strategy = values.get("strategy", "single")
    cls = strategy_class(strategy)
    section = cls.name.replace("-", "_")
    table = values.pop(section, None) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{cls.name}] must be a table of {cls.name} options")
    known = set(option_names(cls.Options))
    options = {key: values.pop(key) for key in list(values) if key in known and key not in COMMON}
    for key in list(table):
        if key not in known:
            names = ", ".join(sorted(known))
            raise ConfigError(f"{source}: [{cls.name}] has no option {key!r}; it has: {names}")
    options.update(table)
    _refuse_other_strategies(values, strategy, source)
    common = from_dict(TrainConfig, {k: v for k, v in values.items() if k in COMMON}, source=source)
    unknown = sorted(set(values) - set(COMMON))
    if unknown:  # from_dict named none: they are neither common nor any strategy's
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
    options = make_options(
        cls.Options, None, _as_tuples(cls.Options, options), source=f"{source} [{cls.name}]"
    )
    return dataclasses.replace(common, options=options)


def _as_tuples(options_class: type, values: dict[str, Any]) -> dict[str, Any]:
    tuples = {f.name for f in dataclasses.fields(options_class) if "tuple" in str(f.type)}
    return {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()}


def owners(name: str) -> list[str]:
    """The registered strategies whose options include ``name``."""
    return [strategy for strategy in STRATEGIES if name in option_names(strategy_class(strategy).Options)]


def _refuse_other_strategies(values: dict[str, Any], strategy: str, source: str) -> None:
    for key in values:
        if key in COMMON:
            continue
        section = key.replace("_", "-")
        if section in STRATEGIES and section != strategy:
            raise ConfigError(f"{source}: [{section}] holds options of --strategy {section}, not {strategy}")
        belongs = owners(key)
        if belongs:
            raise ConfigError(
                f"{source}: {key} is an option of --strategy {' / '.join(belongs)}, not {strategy}; "
                f"drop it or choose --strategy {belongs[0]}"
            )


def config_to_toml(config: TrainConfig) -> str:
    """The config as TOML that :func:`load_config_file` reads back to an equal config."""
    values = {name: getattr(config, name) for name in COMMON}
    values[strategy_class(config.strategy).name] = config.options
    return mapping_to_toml(values)


def load_config_file(path: str | Path) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file, or YAML (``.yaml``, ``.yml``) when PyYAML is installed."""
    return config_from_dict(read_file(path), source=str(path))
