"""Checks that replicas agree: the same model on every rank, the same weights after a step.

* :func:`check_same_model` gathers every rank's parameter names, shapes and dtypes (c10d
  ``all_gather_object``) and raises ConfigError on every rank when any differs;
* :func:`weights_checksum` is two float64 numbers (the sum and a position-weighted sum of every weight)
  that change when any weight changes, cheap to compare across ranks with a MIN/MAX allreduce; a
  checksum that is not finite means the weights are not: training diverged
  (:func:`nonfinite_weights_error`), which is no disagreement between replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlearn.checkpoint import restart_advice
from distlearn.errors import ConfigError, DivergenceError

__all__ = ["check_same_model", "nonfinite_weights_error", "weights_checksum"]


def _describe_model(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]


def check_same_model(model: nn.Module, rank: int, world_size: int) -> None:
    """Raise ConfigError on every rank if any rank's parameters differ in names, shapes or dtypes."""
    mine = _describe_model(model)
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine)
    for other_rank, theirs in enumerate(everyone):
        if theirs == mine:
            continue
        count = (len(mine), sum(torch.Size(s).numel() for _, s, _ in mine))
        other = (len(theirs), sum(torch.Size(s).numel() for _, s, _ in theirs))
        first = next(
            (f"{a} vs {b}" for a, b in zip(mine, theirs, strict=False) if a != b),
            "one model has extra parameters",
        )
        raise ConfigError(
            f"rank {rank} and rank {other_rank} hold different models ({count[0]} tensors / {count[1]:,} "
            f"parameters vs {other[0]} / {other[1]:,}; first difference: {first}); every worker must "
            "build the same architecture -- check --model and the dataset's shape on every machine"
        )


def weights_checksum(model: nn.Module) -> torch.Tensor:
    """Two float64 numbers that change if any weight changes: sum and a position-weighted sum."""
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")  # the collective's device too
    total = torch.zeros(2, dtype=torch.float64, device=device)
    offset = 0
    for p in parameters:
        flat = p.detach().reshape(-1).double()
        weights = torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64, device=device)
        total[0] += flat.sum()
        total[1] += (flat * weights).sum()
        offset += flat.numel()
    return total


def nonfinite_weights_error(step: int, rank: int, mine_finite: bool, run: Any = None) -> DivergenceError:
    """The error for non-finite weights found by a replica check at ``step``: divergence (the learning
    rate), not a bug; ``run`` (the TrainConfig, or None) names the last good checkpoint."""
    where = "this rank's weights" if not mine_finite else "another rank's weights (this rank's are finite)"
    out = getattr(run, "out", None)
    directory = Path(out) / "checkpoints" if out is not None and getattr(run, "checkpoints", True) else None
    advice = restart_advice(directory) if out is not None else ""
    return DivergenceError(
        f"rank {rank}: training diverged by step {step}: {where} are not finite (found by --check-every). "
        "The learning rate is likely too high: lower --lr (e.g. by 10x), or add --clip-grad-norm 1.0. "
        + advice
    )
