"""The one trainer loop every strategy plugs into: data, forward, backward, combine, step, evaluate, save.

Mini-batch stochastic gradient descent as in the overview (Arnold, 2016, section 2): at step ``t`` with
a mini-batch ``B_t`` of the training set,

    g_t = (1 / |B_t|) sum_{(x, y) in B_t} grad_w L(f(x; w_t), y),        w_{t+1} = w_t - eta_t * u(g_t)

where ``L`` is the cross-entropy, ``u`` is the optimizer's update (plain SGD, momentum, Adam, ... from
:mod:`distlearn.optim` or ``torch.optim``) and ``eta_t`` the learning-rate schedule. A
:class:`distlearn.parallel.Strategy` decides which examples ``B_t`` this replica sees and how replicas
combine ``g_t`` or ``w`` (the single-process strategy does nothing). The loop::

    for epoch, for step:  x, y = batch(strategy)            # global batch B, this replica's M = B / R
                          loss = L(model(x), y); loss.backward()
                          strategy.before_step(...)          # e.g. allreduce the gradients
                          clip_grad_norm_(...)               # optional, on the combined gradient
                          optimizer.step(); scheduler.step(); strategy.after_step(...)
                          every log_every steps: a metrics record; every eval_every: test accuracy;
                          every checkpoint_every: an atomic checkpoint

Reproducibility: ``seed`` fixes the weights' initialisation, the data order (a permutation per epoch that
depends only on ``(seed, epoch)``), dropout and augmentation (a dedicated ``torch.Generator``), and
deterministic algorithms are switched on, so two runs with one seed end with identical weights, and a run
resumed from any checkpoint -- mid-epoch included -- ends with bit-identical weights to one that never
stopped (the checkpoint holds the model, optimizer, scheduler, strategy state, the data position and every
RNG state).

Python API::

    from distlearn.train import TrainConfig, train
    result = train(TrainConfig(dataset="fashion-mnist", model="lenet", optimizer="adam", epochs=2))
    print(result.test_accuracy)

The same fields are the flags of ``distlearn train`` and the keys of its ``--config`` file.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from distlearn.checkpoint import load_checkpoint, save_checkpoint
from distlearn.data.prepare import prepare_data
from distlearn.errors import ConfigError
from distlearn.evaluation import evaluate
from distlearn.metrics import MetricRecord, MetricsWriter
from distlearn.models import MODELS, count_parameters, create_model
from distlearn.parallel import STRATEGIES, Strategy, create_strategy

__all__ = [
    "LRSchedule",
    "TrainConfig",
    "TrainResult",
    "create_optimizer",
    "evaluate",
    "needs_closure",
    "optimizer_names",
    "train",
    "validate_config",
]

DatasetName = Literal["mnist", "fashion-mnist", "cifar10"]
ModelName = Literal["mlp", "lenet", "resnet8", "resnet14", "resnet20"]


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is a ``distlearn train --flag`` and a config-file key."""

    dataset: DatasetName = field(default="fashion-mnist", metadata={"help": "dataset to train and test on"})
    model: ModelName = field(
        default="lenet",
        metadata={"help": "network: mlp, lenet (28x28 inputs), resnet8/14/20 (CIFAR ResNets of He et al.)"},
    )
    optimizer: str = field(
        default="adam",
        metadata={
            "help": "a distlearn.optim name (sgd, momentum, nesterov, adagrad, rmsprop, adadelta, adam, "
            "cg-fr, cg-hs) or torch-<name> for torch.optim.<Name> (torch-sgd, torch-adamw, ...)"
        },
    )
    lr: float | None = field(
        default=None, metadata={"help": "peak learning rate (default: the optimizer's own default)"}
    )
    optimizer_option: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "extra optimizer hyper-parameters as KEY=VALUE, e.g. momentum=0.9 weight_decay=5e-4"
        },
    )
    epochs: int = field(default=2, metadata={"help": "passes over the training set"})
    steps: int | None = field(
        default=None, metadata={"help": "stop after this many optimizer steps in total (overrides --epochs)"}
    )
    batch_size: int = field(
        default=128, metadata={"help": "global batch B (each of R replicas sees B / R examples per step)"}
    )
    eval_batch_size: int = field(default=1000, metadata={"help": "batch size for test-set evaluation"})
    schedule: Literal["constant", "step", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate schedule after the warm-up"}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "linear warm-up: step t < W uses lr * (t + 1) / W"}
    )
    lr_decay_every: int = field(
        default=0, metadata={"help": "step schedule: multiply the lr by --lr-decay-factor every N steps"}
    )
    lr_decay_factor: float = field(default=0.1, metadata={"help": "step schedule: factor per decay"})
    min_lr_factor: float = field(
        default=0.0, metadata={"help": "cosine schedule: final lr as a fraction of the peak lr"}
    )
    clip_grad_norm: float | None = field(
        default=None, metadata={"help": "clip the global gradient 2-norm to this value before each step"}
    )
    augment: bool | None = field(
        default=None,
        metadata={"help": "random crop + horizontal flip on training batches (default: on for cifar10 only)"},
    )
    train_samples: int | None = field(
        default=None, metadata={"help": "train on a seeded random subset of this many examples (quick runs)"}
    )
    test_samples: int | None = field(
        default=None, metadata={"help": "evaluate on the first N test examples only (quick runs)"}
    )
    data_root: str | None = field(
        default=None,
        metadata={"help": "dataset directory (default: DISTLEARN_DATA, system locations, cache)"},
    )
    strategy: str = field(
        default="single", metadata={"help": "how replicas combine work: " + ", ".join(STRATEGIES)}
    )
    workers: int = field(
        default=1,
        metadata={"help": "processes on this machine (torchrun underneath); under torchrun: its world size"},
    )
    reducer: str = field(
        default="backend",
        metadata={"help": "sync: allreduce algorithm: backend, ring, tree, rabenseifner, segmented-ring"},
    )
    bucket_mb: float = field(
        default=25.0, metadata={"help": "sync: gradient bucket size in MiB (0: one message per tensor)"}
    )
    overlap: bool = field(
        default=True, metadata={"help": "sync: start each bucket's allreduce during backward"}
    )
    check_every: int = field(
        default=0, metadata={"help": "sync: verify every N steps that replicas hold identical weights"}
    )
    compression: str = field(
        default="none",
        metadata={
            "help": "sync: gradient codec: none, fp16, bf16, int8-linear, int8-tree, threshold, onebit, "
            "terngrad, qsgd, topk, randomk, dgc, powersgd (distlearn.comm.compression)"
        },
    )
    compression_option: tuple[str, ...] = field(
        default=(),
        metadata={"help": "sync: codec options as KEY=VALUE, e.g. threshold=0.01 levels=4 warmup_steps=200"},
    )
    density: float | None = field(
        default=None, metadata={"help": "sync: topk/randomk/dgc: fraction of gradient elements sent, (0, 1]"}
    )
    rank: int | None = field(default=None, metadata={"help": "sync: powersgd: approximation rank r >= 1"})
    servers: int = field(
        default=1, metadata={"help": "ps: parameter-server ranks (the first S ranks); the rest are workers"}
    )
    softsync: int = field(
        default=1, metadata={"help": "ps: apply gradients in groups of n (1: async, workers: synchronous)"}
    )
    backup_workers: int = field(
        default=0, metadata={"help": "ps: b extra workers; each step uses the first R gradients, drops b"}
    )
    local_steps: int = field(default=1, metadata={"help": "ps: pull and push every k local steps"})
    staleness_aware: bool = field(
        default=False, metadata={"help": "ps: divide each gradient by its staleness (Zhang et al. 2016)"}
    )
    worker_timeout: float = field(
        default=60.0, metadata={"help": "ps: seconds of silence after which a server drops a worker"}
    )
    ps_shared_memory: bool = field(
        default=True,
        metadata={
            "help": "ps: a worker and a server on the same machine move gradients and weights through "
            "shared memory (/dev/shm), headers over the backend; --no-ps-shared-memory: all over the backend"
        },
    )
    stages: int = field(
        default=0, metadata={"help": "dni: cut the model into K stages, one process each (--workers = K)"}
    )
    cdni: bool = field(
        default=False, metadata={"help": "dni: condition the synthetic gradients on the label (cDNI)"}
    )
    average_every: int = field(
        default=4, metadata={"help": "local-sgd: k, local steps between two parameter averages"}
    )
    post_local_warmup: int = field(
        default=0, metadata={"help": "local-sgd: synchronous steps before local SGD starts (post-local SGD)"}
    )
    easgd_mode: Literal["sync", "async"] = field(
        default="sync", metadata={"help": "easgd: sync (allreduce) or async (rank 0 holds the centre)"}
    )
    elastic_rho: float | None = field(
        default=None, metadata={"help": "easgd: elastic coefficient rho; moving rate alpha = lr * rho"}
    )
    moving_rate: float | None = field(
        default=None, metadata={"help": "easgd: moving rate alpha itself (default 0.9 / workers)"}
    )
    elastic_tau: int = field(default=1, metadata={"help": "easgd: steps between elastic exchanges (tau)"})
    buckwild: bool = field(
        default=False,
        metadata={"help": "hogwild: 8-bit shared weights with unbiased stochastic rounding (Buckwild!)"},
    )
    comm_timeout: float = field(
        default=300.0, metadata={"help": "seconds before a stuck collective or dead peer ends the job"}
    )
    seed: int = field(default=0, metadata={"help": "seed for weights, data order, dropout and augmentation"})
    deterministic: bool = field(
        default=True, metadata={"help": "use torch's deterministic algorithms (identical runs per seed)"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)"})
    eval_every: int = field(
        default=0, metadata={"help": "evaluate on the test set every N steps (0: at the end of each epoch)"}
    )
    log_every: int = field(default=50, metadata={"help": "write a training metrics record every N steps"})
    out: str = field(default="runs/train", metadata={"help": "run directory: metrics.jsonl, checkpoints/"})
    name: str | None = field(default=None, metadata={"help": "run name in the metrics (default: OUT's name)"})
    checkpoints: bool = field(
        default=True, metadata={"help": "write checkpoints to OUT/checkpoints (--no-checkpoints: none)"}
    )
    checkpoint_every: int = field(
        default=0, metadata={"help": "save a checkpoint every N steps (0: at the end of each epoch)"}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk (>= 2)"})
    resume: str | None = field(
        default=None, metadata={"help": "checkpoint file, or directory (its newest), to resume from"}
    )
    progress: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "progress bar: auto shows it on a terminal only"}
    )
    tensorboard: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "TensorBoard events in OUT/tensorboard (auto: if installed)"}
    )
    quiet: bool = field(default=False, metadata={"help": "do not print the summary at the end"})


@dataclass
class TrainResult:
    """What :func:`train` returns. Accuracies are fractions in [0, 1]; times are seconds."""

    model: nn.Module
    test_accuracy: float
    test_loss: float
    best_accuracy: float
    steps: int
    epochs: float
    samples_per_s: float
    train_seconds: float
    wall_time: float
    seconds_per_epoch: list[float]
    metrics_path: Path | None
    checkpoint: Path | None
    evaluations: list[MetricRecord]
    summary: dict[str, Any]


class ImageDataset(Protocol):
    """What the trainer needs from a dataset (:class:`distlearn.data.ArrayDataset` has it)."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: Any  # one entry per class
    mean: Any  # per-channel means of images / 255
    std: Any  # per-channel standard deviations of images / 255


# -- optimizers --------------------------------------------------------------------------------------------


def _torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    found = {}
    for attribute in dir(torch.optim):
        value = getattr(torch.optim, attribute)
        if (
            inspect.isclass(value)
            and issubclass(value, torch.optim.Optimizer)
            and value is not torch.optim.Optimizer
        ):
            found["torch-" + attribute.lower()] = value
    return found


def _distlearn_optim() -> Any:
    from distlearn import optim

    return optim


def optimizer_names() -> list[str]:
    """Every accepted ``--optimizer``: distlearn.optim's names, then ``torch-<lowercased class name>``."""
    optim = _distlearn_optim()
    ours = list(optim.OPTIMIZERS) if optim is not None else []
    return ours + sorted(_torch_optimizers())


def needs_closure(name: str) -> bool:
    """True when optimizer ``name`` re-evaluates the loss inside ``step(closure)`` (CG, L-BFGS)."""
    if name.startswith("torch-"):
        return name == "torch-lbfgs"
    optim = _distlearn_optim()
    return bool(optim is not None and name in optim.OPTIMIZERS and optim.needs_closure(name))


def parse_options(options: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("momentum=0.9", "betas=0.9,0.99", "nesterov=true")`` -> ``{"momentum": 0.9, ...}``."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"optimizer option {option!r} is not KEY=VALUE; write e.g. momentum=0.9")
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            parsed[key] = lowered == "true"
            continue
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"optimizer option {option!r}: {text!r} is not a number, tuple or true/false"
            ) from None
        parsed[key] = value
    return parsed


def create_optimizer(
    name: str, params: Any, *, lr: float | None = None, **options: Any
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params``.

    The rule: a name from ``distlearn.optim.OPTIMIZERS`` builds ours (``distlearn.optim.create``);
    ``torch-<name>`` builds ``torch.optim`` 's class whose lowercased name is ``<name>`` (``torch-sgd`` is
    ``torch.optim.SGD``, ``torch-adamw`` is ``torch.optim.AdamW``). ``lr=None`` keeps the optimizer's
    default; ``options`` are passed as keyword hyper-parameters.
    """
    hyper = dict(options)
    if lr is not None:
        hyper["lr"] = lr
    torch_classes = _torch_optimizers()
    if name in torch_classes:
        cls = torch_classes[name]
        try:
            return cls(params, **hyper)
        except TypeError as error:
            raise ConfigError(f"optimizer {name}: {error}; check --optimizer-option names") from error
    optim = _distlearn_optim()
    if optim is not None and name in optim.OPTIMIZERS:
        try:
            return optim.create(name, params, **hyper)
        except TypeError as error:
            raise ConfigError(f"optimizer {name}: {error}; check --optimizer-option names") from error
    raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(optimizer_names())}")


# -- learning-rate schedule --------------------------------------------------------------------------------


@dataclass
class LRSchedule:
    """Learning-rate multiplier ``f(t)`` of optimizer step ``t`` (0-based), used through ``LambdaLR``.

    Warm-up (Goyal et al., 2017, "Accurate, large minibatch SGD"): ``f(t) = (t + 1) / W`` for ``t < W``.
    After it, with ``s = t - W`` and ``T = total - W`` steps left:

    * ``constant``: ``f = 1``;
    * ``step``: ``f = gamma ** floor(s / every)``;
    * ``cosine`` (Loshchilov and Hutter, 2017, SGDR without restarts):
      ``f = m + (1 - m) * (1 + cos(pi * min(s, T) / T)) / 2``, from 1 down to ``m = min_factor``.

    A plain-valued object (not a lambda) so ``LambdaLR.state_dict()`` stores it and checkpoints stay
    ``weights_only``-loadable.
    """

    kind: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    decay_every: int = 0
    decay_factor: float = 0.1
    min_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        since = step - self.warmup_steps
        if self.kind == "step":
            return self.decay_factor ** (since // self.decay_every)
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(since, span) / span
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" and self.warmup_steps == 0


# -- validation --------------------------------------------------------------------------------------------


def validate_config(config: TrainConfig, *, check_optimizer: bool = True) -> None:
    """Reject impossible values and combinations with a message that names the fix.

    ``check_optimizer=False`` skips the optimizer name (the Python API was given an optimizer object).
    """

    def positive(
        name: str, value: float | None, *, allow_none: bool = False, allow_zero: bool = False
    ) -> None:
        if value is None and allow_none:
            return
        if value is None or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")

    if config.model not in MODELS:
        raise ConfigError(f"unknown model {config.model!r}; choose one of: {', '.join(MODELS)}")
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {config.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    positive("workers", config.workers)
    positive("bucket_mb", config.bucket_mb, allow_zero=True)
    positive("check_every", config.check_every, allow_zero=True)
    positive("comm_timeout", config.comm_timeout)
    _validate_compression(config)
    positive("servers", config.servers)
    positive("softsync", config.softsync)
    positive("backup_workers", config.backup_workers, allow_zero=True)
    positive("local_steps", config.local_steps)
    positive("worker_timeout", config.worker_timeout)
    positive("average_every", config.average_every)
    positive("post_local_warmup", config.post_local_warmup, allow_zero=True)
    positive("elastic_rho", config.elastic_rho, allow_none=True, allow_zero=True)
    positive("moving_rate", config.moving_rate, allow_none=True, allow_zero=True)
    positive("elastic_tau", config.elastic_tau)
    if config.buckwild and config.strategy != "hogwild":
        raise ConfigError(
            f"--buckwild (8-bit shared weights) belongs to --strategy hogwild, not {config.strategy!r}; "
            "drop --buckwild or use --strategy hogwild"
        )
    positive("epochs", config.epochs)
    positive("steps", config.steps, allow_none=True)
    positive("batch_size", config.batch_size)
    positive("eval_batch_size", config.eval_batch_size)
    positive("lr", config.lr, allow_none=True)
    positive("warmup_steps", config.warmup_steps, allow_zero=True)
    positive("clip_grad_norm", config.clip_grad_norm, allow_none=True)
    positive("eval_every", config.eval_every, allow_zero=True)
    positive("log_every", config.log_every)
    positive("checkpoint_every", config.checkpoint_every, allow_zero=True)
    positive("train_samples", config.train_samples, allow_none=True)
    positive("test_samples", config.test_samples, allow_none=True)
    positive("threads", config.threads, allow_none=True)
    if config.keep_checkpoints < 2:
        raise ConfigError(
            "--keep-checkpoints must be >= 2 so the previous good checkpoint survives, "
            f"got {config.keep_checkpoints}"
        )
    if config.schedule == "step" and config.lr_decay_every < 1:
        raise ConfigError("--schedule step needs --lr-decay-every N (steps between decays), e.g. 1000")
    if config.schedule != "step" and config.lr_decay_every:
        raise ConfigError(
            f"--lr-decay-every only applies to --schedule step (got --schedule {config.schedule})"
        )
    if not 0 < config.lr_decay_factor <= 1:
        raise ConfigError(f"--lr-decay-factor must be in (0, 1], got {config.lr_decay_factor}")
    if not 0 <= config.min_lr_factor <= 1:
        raise ConfigError(f"--min-lr-factor must be in [0, 1], got {config.min_lr_factor}")
    if config.min_lr_factor and config.schedule != "cosine":
        raise ConfigError(
            f"--min-lr-factor only applies to --schedule cosine (got --schedule {config.schedule})"
        )
    if config.augment and config.dataset == "mnist":
        raise ConfigError(
            "--augment flips and shifts images, and a mirrored digit is a different digit; "
            "drop --augment for mnist (use it with cifar10 or fashion-mnist)"
        )
    if config.checkpoint_every and not config.checkpoints:
        raise ConfigError("--checkpoint-every needs checkpoints; drop --no-checkpoints")
    if config.train_samples is not None and config.train_samples < config.batch_size:
        raise ConfigError(
            f"--train-samples {config.train_samples} is smaller than --batch-size {config.batch_size}: "
            "no full batch; raise --train-samples or lower --batch-size"
        )
    known = optimizer_names()
    if check_optimizer and config.optimizer not in known:
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; choose one of: {', '.join(known)}")
    parse_options(config.optimizer_option)
    if config.resume is not None and not Path(config.resume).exists():
        raise ConfigError(
            f"--resume {config.resume}: no such file or directory; pass a checkpoint written by a run"
        )


def _validate_compression(config: TrainConfig) -> None:
    """ConfigError for an unknown codec, a bad codec option, or a strategy the codec cannot serve."""
    given = [flag for flag in ("density", "rank") if getattr(config, flag) is not None]
    if config.compression == "none":
        if given or config.compression_option:
            flags = ", ".join(
                [f"--{flag}" for flag in given] + ["--compression-option"] * bool(config.compression_option)
            )
            raise ConfigError(f"{flags} only apply with --compression NAME (e.g. --compression topk)")
        return
    if config.strategy not in ("sync", "ps"):
        raise ConfigError(
            f"--compression {config.compression} serves --strategy sync (the allreduce of the gradient "
            f"buckets) and ps (the workers' pushes), which --strategy {config.strategy} does not perform "
            "(ddp: register the codec with distlearn.comm.ddp_hooks.compression_ddp_comm_hook)"
        )
    from distlearn.comm.compression import create_compressor
    from distlearn.parallel.sync import compression_options_of

    if config.strategy == "ps":
        from distlearn.parallel.ps import make_push_codec

        make_push_codec(config.compression, compression_options_of(config))
    else:
        codec = create_compressor(config.compression, **compression_options_of(config))
        if codec.handles_momentum:  # say so now, before any worker starts
            from distlearn.parallel.sync import check_no_optimizer_momentum

            probe = [torch.zeros(1, requires_grad=True)]
            options = parse_options(config.optimizer_option)
            optimizer = create_optimizer(config.optimizer, probe, **options)
            check_no_optimizer_momentum(config.compression, optimizer)


# -- helpers -----------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(augment_generator: torch.Generator) -> dict[str, Any]:
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "augment": augment_generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], augment_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    augment_generator.set_state(state["augment"])


@contextlib.contextmanager
def _torch_settings(config: TrainConfig) -> Iterator[None]:
    """Deterministic algorithms and the thread count for the run; the previous settings come back after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(config.deterministic)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


class _Progress:
    """A rich progress bar on the main rank when wanted; otherwise every call is a no-op."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
        )
        self._task = self._bar.add_task("train", total=total, completed=done, status="")
        self._bar.start()

    def update(self, completed: int, status: str | None = None) -> None:
        if self._bar is not None:
            fields = {} if status is None else {"status": status}
            self._bar.update(self._task, completed=completed, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# -- the loop ----------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    strategy: Strategy | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    train_data: ImageDataset | None = None,
    test_data: ImageDataset | None = None,
) -> TrainResult:
    """Train ``config.model`` (or ``model``) on ``config.dataset`` (or ``train_data``) and return the result.

    Args:
        config: the run's settings (:class:`TrainConfig`).
        strategy: how replicas combine their work; default ``create_strategy(config.strategy)``.
        model: a ready model instead of ``config.model`` (the seed still fixes data order and dropout).
        optimizer: a ready optimizer over ``model``'s parameters instead of ``config.optimizer``;
            it may be any ``torch.optim.Optimizer``. Set ``optimizer.requires_closure = True`` on one whose
            ``step`` needs a closure.
        train_data, test_data: datasets (``images`` uint8 N x C x H x W, ``labels``, ``classes``, ``mean``,
            ``std``) instead of loading ``config.dataset``.
    """
    validate_config(config, check_optimizer=optimizer is None)
    if optimizer is not None and model is None:
        raise ConfigError(
            "an optimizer was passed without its model; pass model= too (the optimizer's parameters)"
        )
    if model is not None and optimizer is not None:
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for group in optimizer.param_groups for p in group["params"]):
            raise ConfigError(
                "the optimizer holds parameters that are not the model's; build it on model.parameters()"
            )
    if (train_data is None) != (test_data is None):
        raise ConfigError("pass both train_data and test_data, or neither (to load config.dataset)")
    strategy = strategy if strategy is not None else create_strategy(config.strategy, config)
    with _torch_settings(config):
        strategy.setup(config.seed)
        try:
            if not strategy.trains:  # e.g. a parameter server: its whole life is serving the workers
                strategy.serve()
                return _served_result(strategy)
            return _train(config, strategy, model, optimizer, train_data, test_data)
        finally:
            strategy.close()


def _served_result(strategy: Strategy) -> TrainResult:
    return TrainResult(
        model=nn.Identity(),
        test_accuracy=math.nan,
        test_loss=math.nan,
        best_accuracy=math.nan,
        steps=0,
        epochs=0.0,
        samples_per_s=0.0,
        train_seconds=0.0,
        wall_time=0.0,
        seconds_per_epoch=[],
        metrics_path=None,
        checkpoint=None,
        evaluations=[],
        summary={"role": strategy.role, "strategy": strategy.describe()},
    )


def _train(
    config: TrainConfig,
    strategy: Strategy,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    train_data: ImageDataset | None,
    test_data: ImageDataset | None,
) -> TrainResult:
    started = time.perf_counter()
    user_model, user_optimizer = model is not None, optimizer is not None
    data = prepare_data(
        config.dataset,
        data_root=config.data_root,
        train_samples=config.train_samples,
        test_samples=config.test_samples,
        seed=config.seed,
        augment=config.augment,
        train_data=train_data,
        test_data=test_data,
    )
    train_data = data.train
    train_images, train_labels = data.train_images, data.train_labels
    test_images, test_labels = data.test_images, data.test_labels
    channels, height, _ = data.image_shape
    num_classes = data.num_classes
    augment, train_transform = data.augment, data.transform
    n_train = len(train_labels)
    global_batch = config.batch_size
    strategy.local_batch(global_batch)  # validates B against the number of replicas
    steps_per_epoch = strategy.steps_per_epoch(n_train, global_batch)
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {global_batch} exceeds the {n_train} training examples; lower it")
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    # Model and optimizer: one seed, so every replica builds the same initial weights.
    _seed_everything(config.seed)
    if model is None:
        model = create_model(config.model, in_channels=channels, num_classes=num_classes, image_size=height)
    closure_needed = bool(getattr(optimizer, "requires_closure", False)) or isinstance(
        optimizer, torch.optim.LBFGS
    )
    if optimizer is None:
        optimizer = create_optimizer(
            config.optimizer, model.parameters(), lr=config.lr, **parse_options(config.optimizer_option)
        )
        closure_needed = needs_closure(config.optimizer)
    model, optimizer = strategy.prepare(model, optimizer)
    schedule = LRSchedule(
        kind=config.schedule,
        total_steps=total_steps,
        warmup_steps=config.warmup_steps,
        decay_every=config.lr_decay_every,
        decay_factor=config.lr_decay_factor,
        min_factor=config.min_lr_factor,
    )
    scheduler = None if schedule.is_constant else torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    augment_generator = torch.Generator().manual_seed(config.seed * 7919 + 17 + strategy.rank)

    # Position in the run; a checkpoint overwrites all of it.
    epoch, step_in_epoch, step, samples = 0, 0, 0, 0
    clock_offset = 0.0  # wall time of the run before this process (resumed runs continue the clock)
    best_accuracy = -1.0
    seconds_per_epoch: list[float] = []
    if config.resume is not None:
        state = load_checkpoint(config.resume)
        _check_resume(config, state["config"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        strategy.load_state_dict(state["strategy"])
        position = state["position"]
        epoch, step_in_epoch, step = position["epoch"], position["step_in_epoch"], position["step"]
        samples, clock_offset = position["samples"], position["wall_time"]
        best_accuracy = position["best_accuracy"]
        seconds_per_epoch = list(position["seconds_per_epoch"])
        if position["epoch_complete"]:
            epoch, step_in_epoch = epoch + 1, 0
        _set_rng_state(state["rng"], augment_generator)

    out = Path(config.out)
    writer = MetricsWriter(
        out,
        run=config.name,
        rank=strategy.rank,
        world_size=strategy.world_size,
        role=strategy.role,
        tensorboard=config.tensorboard if strategy.is_main else "off",
        append=config.resume is not None,
    )
    checkpoint_dir = out / "checkpoints"
    last_checkpoint: Path | None = None
    evaluations: list[MetricRecord] = []
    show_progress = strategy.is_main and (
        config.progress == "on" or (config.progress == "auto" and sys.stderr.isatty())
    )
    progress = _Progress(show_progress, total_steps, step)
    progress_every = max(1, steps_per_epoch // 100)

    def now() -> float:
        return clock_offset + time.perf_counter() - started

    def lr_now() -> float:
        return float(optimizer.param_groups[0]["lr"])

    def stats_fields() -> dict[str, Any]:
        stats = strategy.stats()
        return {"bytes_sent": stats.get("bytes_sent"), "staleness": stats.get("staleness")}

    def run_evaluation() -> MetricRecord:
        nonlocal best_accuracy
        loss, accuracy = evaluate(
            strategy.evaluation_model(model),
            test_images,
            test_labels,
            train_transform,
            config.eval_batch_size,
        )
        best_accuracy = max(best_accuracy, accuracy)
        record = MetricRecord(
            kind="eval", step=step, epoch=step / steps_per_epoch, wall_time=now(), loss=loss,
            accuracy=accuracy, lr=lr_now(), **stats_fields(),
        )  # fmt: skip
        writer.write(record)
        evaluations.append(record)
        return record

    def save(epoch_complete: bool) -> None:
        nonlocal last_checkpoint
        if not (config.checkpoints and strategy.is_main):
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "strategy": strategy.state_dict(),
            "position": {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "step": step,
                "samples": samples,
                "wall_time": now(),
                "epoch_complete": epoch_complete,
                "best_accuracy": best_accuracy,
                "seconds_per_epoch": list(seconds_per_epoch),
            },
            "rng": _rng_state(augment_generator),
            "config": asdict(config),
            "versions": {"torch": str(torch.__version__)},
        }
        last_checkpoint = save_checkpoint(state, checkpoint_dir, step, keep=config.keep_checkpoints)

    # Training-window accumulators: tensors, so no .item() synchronisation except when a record is written.
    window_loss = torch.zeros(())
    window_correct = torch.zeros((), dtype=torch.int64)
    window_samples = 0
    window_started = time.perf_counter()
    window_comm = 0.0  # seconds of the window spent blocked in the strategy's step hooks (communication)
    train_seconds = 0.0  # time in training steps only (evaluation and checkpoints excluded)
    segment_started = time.perf_counter()
    parameters = [p for p in model.parameters() if p.requires_grad]
    hook_seconds = [0.0]  # the closure's time in strategy.before_step (closure optimizers call it inside)
    model.train()
    loss_fn = nn.functional.cross_entropy

    try:
        while epoch < epochs and step < total_steps:
            epoch_train_seconds = 0.0
            batches = strategy.batches(
                n_train, global_batch=global_batch, seed=config.seed, epoch=epoch, start_step=step_in_epoch
            )
            for indices in batches:
                x = train_transform(train_images[indices], augment_generator if augment else None)
                y = train_labels[indices]
                if closure_needed:
                    evaluations_in_step: list[tuple[torch.Tensor, torch.Tensor]] = []

                    def closure(
                        x: torch.Tensor = x,
                        y: torch.Tensor = y,
                        seen: list = evaluations_in_step,
                        at: int = step,
                    ) -> torch.Tensor:
                        optimizer.zero_grad(set_to_none=True)
                        out = model(x)
                        value = loss_fn(out, y)
                        value.backward()
                        blocked = time.perf_counter()
                        strategy.before_step(model, optimizer, at)
                        hook_seconds[0] += time.perf_counter() - blocked
                        if config.clip_grad_norm is not None:
                            nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
                        seen.append((value.detach(), out.detach()))
                        return value

                    optimizer.step(closure)
                    window_comm += hook_seconds[0]
                    hook_seconds[0] = 0.0
                    loss, logits = evaluations_in_step[0]
                else:
                    optimizer.zero_grad(set_to_none=True)
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    loss.backward()
                    blocked = time.perf_counter()
                    strategy.before_step(model, optimizer, step)
                    window_comm += time.perf_counter() - blocked
                    if config.clip_grad_norm is not None:
                        nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                blocked = time.perf_counter()
                strategy.after_step(model, optimizer, step)
                window_comm += time.perf_counter() - blocked
                step += 1
                step_in_epoch += 1
                batch = len(y)
                samples += batch
                window_samples += batch
                window_loss += loss.detach() * batch
                window_correct += (logits.argmax(dim=1) == y).sum()

                if step % config.log_every == 0:
                    elapsed = time.perf_counter() - window_started
                    mean_loss = window_loss.item() / window_samples
                    writer.write(
                        MetricRecord(
                            kind="train",
                            step=step,
                            epoch=step / steps_per_epoch,
                            wall_time=now(),
                            loss=mean_loss,
                            accuracy=window_correct.item() / window_samples,
                            samples_per_s=window_samples / elapsed if elapsed > 0 else None,
                            lr=lr_now(),
                            **stats_fields(),
                            extra={"comm_s": window_comm, "compute_s": max(0.0, elapsed - window_comm)},
                        )  # fmt: skip
                    )
                    window_comm = 0.0
                    progress.update(step, f"loss {mean_loss:.4f}")
                    window_loss.zero_()
                    window_correct.zero_()
                    window_samples = 0
                    window_started = time.perf_counter()
                elif step % progress_every == 0:
                    progress.update(step)
                pause = None
                if config.eval_every and step % config.eval_every == 0 and strategy.evaluates:
                    pause = time.perf_counter()
                    record = run_evaluation()
                    progress.update(step, f"test acc {record.accuracy:.4f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    pause = pause or time.perf_counter()
                    save(epoch_complete=step_in_epoch == steps_per_epoch)
                if pause is not None:  # keep evaluation and checkpoints out of the throughput figures
                    paused = time.perf_counter() - pause
                    window_started += paused
                    train_seconds += pause - segment_started
                    epoch_train_seconds += pause - segment_started
                    segment_started = time.perf_counter()
                if step >= total_steps:
                    break
            finished = time.perf_counter()
            train_seconds += finished - segment_started
            epoch_train_seconds += finished - segment_started
            if step_in_epoch == steps_per_epoch:
                seconds_per_epoch.append(epoch_train_seconds)
                if hasattr(optimizer, "next_epoch"):  # e.g. Adam(count="epoch"): the overview's p
                    optimizer.next_epoch()
            if strategy.evaluates and not (config.eval_every and step % config.eval_every == 0):
                record = run_evaluation()
                progress.update(step, f"test acc {record.accuracy:.4f}")
            save(epoch_complete=step_in_epoch == steps_per_epoch)
            if step_in_epoch == steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            segment_started = time.perf_counter()
        strategy.barrier()
    finally:
        progress.close()

    final = evaluations[-1] if evaluations else None
    summary: dict[str, Any] = {
        "dataset": getattr(train_data, "name", config.dataset),
        "dataset_source": getattr(train_data, "source", None),
        "dataset_note": getattr(train_data, "note", None),
        "train_examples": n_train,
        "test_examples": len(test_labels),
        "model": type(model).__name__ if user_model else config.model,
        "parameters": count_parameters(model),
        "optimizer": type(optimizer).__name__ if user_optimizer else config.optimizer,
        "optimizer_class": type(optimizer).__name__,
        "lr": config.lr,
        "schedule": config.schedule,
        "global_batch": global_batch,
        "strategy": strategy.describe(),
        "augment": repr(train_transform) if augment else "none",
        "steps": step,
        "epochs": step / steps_per_epoch,
        "test_accuracy": final.accuracy if final else None,
        "test_loss": final.loss if final else None,
        "best_accuracy": best_accuracy if best_accuracy >= 0 else None,
        "train_seconds": train_seconds,
        "seconds_per_epoch": seconds_per_epoch,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "seed": config.seed,
        "threads": torch.get_num_threads(),
        "replicas": strategy.replicas,
    }
    samples_per_s = samples / train_seconds if train_seconds > 0 else 0.0
    # The job's throughput: every replica trains on its own share of each global batch at the same pace.
    summary["job_samples_per_s"] = samples_per_s * strategy.replicas
    writer.write(
        MetricRecord(
            kind="summary",
            step=step,
            epoch=step / steps_per_epoch,
            wall_time=now(),
            loss=final.loss if final else None,
            accuracy=final.accuracy if final else None,
            samples_per_s=samples_per_s,
            lr=lr_now(),
            **stats_fields(),
            extra=summary,
        )  # fmt: skip
    )
    writer.close()
    if strategy.is_main and not config.quiet:
        _print_summary(summary, samples_per_s, now(), writer.path)
    return TrainResult(
        model=model,
        test_accuracy=final.accuracy if final else math.nan,
        test_loss=final.loss if final else math.nan,
        best_accuracy=best_accuracy if best_accuracy >= 0 else math.nan,
        steps=step,
        epochs=step / steps_per_epoch,
        samples_per_s=samples_per_s,
        train_seconds=train_seconds,
        wall_time=now(),
        seconds_per_epoch=seconds_per_epoch,
        metrics_path=writer.path,
        checkpoint=last_checkpoint,
        evaluations=evaluations,
        summary=summary,
    )


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


def _check_resume(config: TrainConfig, saved: dict[str, Any]) -> None:
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


def _print_summary(
    summary: dict[str, Any], samples_per_s: float, wall_time: float, metrics_path: Path
) -> None:
    from rich.console import Console
    from rich.table import Table

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    table = Table(title="distlearn train: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    dataset = f"{summary['dataset']} ({summary['train_examples']} train / {summary['test_examples']} test)"
    rows = [
        ("dataset", dataset),
        ("data note", summary["dataset_note"]),
        ("model", f"{summary['model']} ({summary['parameters']:,} parameters)"),
        (
            "optimizer",
            f"{summary['optimizer']} ({summary['optimizer_class']}), schedule {summary['schedule']}",
        ),
        ("strategy", f"{summary['strategy']}, global batch {summary['global_batch']}"),
        ("steps", f"{summary['steps']} ({summary['epochs']:.2f} epochs)"),
        ("test accuracy", f"{percent(summary['test_accuracy'])} (best {percent(summary['best_accuracy'])})"),
        ("test loss", "-" if summary["test_loss"] is None else f"{summary['test_loss']:.4f}"),
        (
            "throughput",
            f"{summary['job_samples_per_s']:,.0f} samples/s"
            + (
                f" ({summary['replicas']} replicas x {samples_per_s:,.0f}, {summary['threads']} threads each)"
                if summary["replicas"] > 1
                else f" ({summary['threads']} threads)"
            ),
        ),
        (
            "time",
            f"{wall_time:.1f} s wall, {summary['train_seconds']:.1f} s training"
            + (
                f", {sum(summary['seconds_per_epoch']) / len(summary['seconds_per_epoch']):.1f} s per epoch"
                if summary["seconds_per_epoch"]
                else ""
            ),
        ),
        ("metrics", str(metrics_path)),
        ("checkpoint", summary["checkpoint"]),
    ]
    for key, value in rows:
        if value:
            table.add_row(key, str(value))
    Console().print(table)
