"""Checks that replicas agree: the same model on every rank, the same weights after a step.

* :func:`check_same_model` gathers every rank's parameter names, shapes and dtypes (c10d
  ``all_gather_object``) and raises ConfigError on every rank when any differs;
* :func:`weights_checksum` is two float64 numbers (the sum and a position-weighted sum of every weight)
  that change when any weight changes, cheap to compare across ranks with a MIN/MAX allreduce.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlearn.errors import ConfigError

__all__ = ["check_same_model", "weights_checksum"]


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


