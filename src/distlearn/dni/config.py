"""The settings of one model-parallel (DNI) run: :class:`DNIConfig`, the flags of ``distlearn.dni.cli``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distlearn.errors import ConfigError

__all__ = ["DNIConfig"]


@dataclass
class DNIConfig:
    """One model-parallel run. Each field is a flag of ``python -m distlearn.dni.cli``."""

    dataset: Literal["mnist", "fashion-mnist", "cifar10"] = field(
        default="mnist", metadata={"help": "dataset (mnist: the seeded 8,000/2,000 split of its test set)"}
    )
    model: Literal["mlp", "lenet", "resnet8"] = field(
        default="mlp",
        metadata={"help": "mlp: the paper's FCN, one hidden layer of 256 per stage; lenet: CNN"},
    )
    stages: int = field(default=3, metadata={"help": "K, stages of the model = processes of the job"})
    mode: Literal["dni", "backprop"] = field(
        default="dni", metadata={"help": "dni: synthetic gradients; backprop: model-parallel backprop"}
    )
    cdni: bool = field(default=False, metadata={"help": "condition synthetic gradients on the label (cDNI)"})
    batch_norm: bool = field(
        default=False,
        metadata={
            "help": "mlp only: batch normalisation between each hidden layer's linear map and its ReLU "
            "(the paper's FCN); each stage keeps its statistics, evaluation uses the running ones"
        },
    )
    epochs: int = field(default=1, metadata={"help": "passes over the training set"})
    steps: int | None = field(
        default=None, metadata={"help": "stop after this many steps (overrides epochs)"}
    )
    batch_size: int = field(default=256, metadata={"help": "examples per step (the paper: 256)"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate of the stages"})
    sg_lr: float = field(
        default=1e-3, metadata={"help": "Adam learning rate of the synthetic-gradient models"}
    )
    sg_hidden: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "hidden widths of each synthetic-gradient model (default: linear; paper: 1024 1024)"
        },
    )
    max_lag: int = field(default=1, metadata={"help": "dni: unanswered activations before a rank waits"})
    timeout_s: float = field(default=60.0, metadata={"help": "deadline of every wait for a peer, seconds"})
    seed: int = field(default=0, metadata={"help": "weights, batch order"})
    train_samples: int | None = field(default=None, metadata={"help": "seeded subset of the training set"})
    test_samples: int | None = field(default=None, metadata={"help": "first N test examples only"})
    data_root: str | None = field(default=None, metadata={"help": "dataset directory"})
    out: str = field(default="runs/dni", metadata={"help": "run directory (metrics, messages)"})
    log_every: int = field(default=50, metadata={"help": "top rank: a training record every N steps"})
    eval_every_epoch: bool = field(
        default=True, metadata={"help": "evaluate after every epoch (else at end)"}
    )
    record_messages: bool = field(
        default=False, metadata={"help": "write every received header to OUT/messages.rank<k>.json"}
    )
    save_model: bool = field(
        default=False, metadata={"help": "rank 0 writes the trained network to OUT/model.pt"}
    )
    threads: int = field(default=1, metadata={"help": "torch threads per rank"})
    die_at_step: int | None = field(
        default=None, metadata={"help": "testing: the top rank exits abruptly at this step"}
    )
    quiet: bool = field(default=False, metadata={"help": "do not print the summary"})

    def validate(self) -> None:
        if self.stages < 2:
            raise ConfigError(f"model parallelism needs --stages >= 2, got {self.stages}")
        for name in ("epochs", "batch_size", "max_lag", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.sg_lr <= 0 or self.timeout_s <= 0:
            raise ConfigError("--lr, --sg-lr and --timeout-s must be positive")
        if self.batch_norm and self.model != "mlp":
            raise ConfigError(
                f"--batch-norm is an option of the mlp FCN only (lenet has none, resnet8 has its own), "
                f"not of --model {self.model}; drop --batch-norm"
            )

    @property
    def sg_widths(self) -> tuple[int, ...]:
        """``sg_hidden`` without zeros (``--sg-hidden 0`` is the linear model, like the default ``()``)."""
        return tuple(w for w in self.sg_hidden if w > 0)
