"""A model that is not an image classifier, trained by distlearn's trainer: a GRU that predicts a sine wave.

The task: given 16 samples of a sine wave ``sin(f t + p)`` (random frequency ``f`` and phase ``p`` per
sequence, plus a little noise), predict the next sample. The model is a one-layer GRU whose last hidden
state goes through a linear layer (one float out); the loss is the mean squared error; the data is made
here, as tensors ``x`` of shape ``(N, 16, 1)`` and ``y`` of shape ``(N, 1)``. There are no class labels, so
the run reports the test loss and no accuracy.

Two replicas with synchronous SGD on this machine, from Python (the workers are started for you; the model,
data and loss are named by import path, so each worker builds its own)::

    python examples/train_sequence_regression.py --workers 2 --steps 300

The same run from the command line, and under torchrun (one process per replica)::

    distlearn train --strategy sync --workers 2 --model examples.train_sequence_regression:make_model \\
        --dataset examples.train_sequence_regression:make_data --loss torch.nn.functional:mse_loss \\
        --optimizer adam --lr 0.01 --batch-size 64 --steps 300
    torchrun --nproc-per-node 2 -m distlearn train --strategy sync \\
        --model examples.train_sequence_regression:make_model \\
        --dataset examples.train_sequence_regression:make_data --loss torch.nn.functional:mse_loss --steps 300

Run them from the repository root (so that ``examples`` imports). In one process, objects work as well:
``distlearn.train(config, model=SineGRU(), loss_fn=nn.functional.mse_loss, train_data=(x, y), ...)``.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import distlearn
from distlearn.train import TrainConfig, TrainResult

MODULE = "examples.train_sequence_regression"
LENGTH = 16  # input samples per sequence


class SineGRU(nn.Module):
    """``(N, T, 1)`` sequences -> ``(N, 1)``: the next sample, from the GRU's last hidden state."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(x)  # last: (1, N, hidden)
        return self.head(last[0])


def sine_sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy sine windows ``x`` (N, 16, 1) and the sample after each, ``y`` (N, 1)."""
    generator = torch.Generator().manual_seed(seed)
    frequency = 0.2 + 0.4 * torch.rand(n, 1, generator=generator)  # radians per sample
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    t = torch.arange(LENGTH + 1, dtype=torch.float32)
    wave = torch.sin(frequency * t + phase) + 0.02 * torch.randn(n, LENGTH + 1, generator=generator)
    return wave[:, :LENGTH, None], wave[:, LENGTH:]


def make_model() -> nn.Module:
    """The ``--model`` factory."""
    return SineGRU()


def make_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The ``--dataset`` factory: (train, test), each a pair of tensors (x, y)."""
    return sine_sequences(2048, seed=1), sine_sequences(512, seed=2)


def run(
    *, workers: int = 2, steps: int = 300, out: str = "runs/sine-gru", quiet: bool = False
) -> TrainResult:
    """Train the GRU with synchronous SGD over ``workers`` replicas; rank 0's result."""
    config = TrainConfig(
        model=f"{MODULE}:make_model",
        dataset=f"{MODULE}:make_data",
        loss="torch.nn.functional:mse_loss",
        strategy="sync" if workers > 1 else "single",
        workers=workers,
        optimizer="adam",
        lr=0.01,
        batch_size=64,
        steps=steps,
        eval_every=max(1, steps // 4),
        log_every=max(1, steps // 10),
        out=out,
        quiet=quiet,
        progress="off",
        tensorboard="off",
    )
    return distlearn.train(config)  # with workers > 1 this starts the job and returns rank 0's result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/sine-gru")
    args = parser.parse_args()
    result = run(workers=args.workers, steps=args.steps, out=args.out)
    print(f"test MSE {result.test_loss:.4f} (predicting 0 scores about 0.5)")
