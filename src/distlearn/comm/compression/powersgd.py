"""PowerSGD (Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", NeurIPS 2019): rank-``r`` approximation by one step of power iteration, with
warm start and error feedback.

For every parameter tensor of a bucket viewed as a matrix ``M`` (``n = shape[0]`` rows, ``m`` columns) on
rank ``w``, with ``e_w`` its error-feedback residual and ``Q`` (``m x r``) kept from the previous step:

    M_w <- M_w + e_w
    P_w = M_w Q                        P = sum_w P_w            (allreduce 1)    P <- orthogonalise(P)
    Q_w = M_w^T P                      Q = sum_w Q_w            (allreduce 2)
    sum_w M_w ~ P Q^T,                 e_w <- M_w - P Q^T / R   (what the average missed)

Both exchanges are allreduces: ``P`` and ``Q`` are linear in ``M``. Instead of ``n m`` numbers a rank sends
``(n + m) r``. Tensors where that saves less than ``min_compression_rate`` (biases, small layers) are
allreduced uncompressed in the first exchange, with no residual.

* Warm start (Algorithm 1's ``Q`` reuse): ``Q`` of step ``t - 1`` (orthogonalised) starts step ``t``, so the
  single power-iteration step keeps improving the subspace; otherwise ``Q`` is drawn afresh from a
  Gaussian whose seed is shared by all ranks.
* ``start_iter``: the first steps are plain allreduces (torch's ``start_powerSGD_iter``), since early
  gradients change fast and compressing them hurts most.

Where we differ from torch's ``powerSGD_hook``: the uncompressed tensors travel in the same allreduce as the
``P`` matrices (one message fewer per bucket); their residual is zero (torch keeps ``local - average`` for
them, which sums to zero over ranks); orthogonalisation is ``torch.linalg.qr`` instead of Gram-Schmidt.

State: :class:`PowerSGDState` keeps, per bucket, the residual ``e_w``, the ``Q`` of every compressed tensor
and the step count -- apart from the codec, as torch's ``PowerSGDState`` is apart from its hook; PowerSGD
is a :class:`~.base.CollectiveCodec` (two exchanges: :meth:`PowerSGD.reduce`).

Tuning: ``rank`` 1-4 for small CNNs (rank 2 is the paper's default for ResNet-18 on CIFAR-10); raise it if
accuracy lags.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from distlearn.comm.compression.base import BucketContext, CollectiveCodec, Shapes, parameter_spans, to_device
from distlearn.comm.compression.exchange import Exchange
from distlearn.comm.compression.memory import ErrorFeedbackState, upgrade_state_dict
from distlearn.errors import ConfigError

__all__ = ["PowerSGD", "PowerSGDState"]


def _orthogonalise(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``matrix`` 's (``n x r``, ``n >= r``)."""
    return torch.linalg.qr(matrix, mode="reduced").Q


class PowerSGDState(ErrorFeedbackState):
    """Per bucket ``key``: the residual and step count (as :class:`~.memory.ErrorFeedbackState`) and the
    ``Q`` of each compressed tensor (``qs[key][index]``, ``m x r``), reused as the next step's warm start."""

    def __init__(self) -> None:
        super().__init__()
        self.qs: dict[str, dict[int, torch.Tensor]] = {}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["qs"] = {k: {str(i): q.clone() for i, q in v.items()} for k, v in self.qs.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qs = {str(k): {int(i): q.clone() for i, q in v.items()} for k, v in state.get("qs", {}).items()}


class PowerSGD(CollectiveCodec):
    """Rank-``rank`` PowerSGD with warm start and error feedback.

    Args:
        rank: ``r`` >= 1.
        start_iter: steps of plain allreduce before compressing.
        warm_start: reuse ``Q`` from the previous step.
        min_compression_rate: compress a tensor only if ``n m > (n + m) r * min_compression_rate``.
    """

    name = "powersgd"
    summable = True

    def __init__(
        self,
        *,
        rank: int = 2,
        start_iter: int = 0,
        warm_start: bool = True,
        min_compression_rate: float = 2.0,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"powersgd: rank must be an integer >= 1, got {rank!r}; 1-4 is typical")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ConfigError(f"powersgd: start_iter must be an integer >= 0, got {start_iter!r}")
        if not min_compression_rate > 0:
            raise ConfigError(
                f"powersgd: min_compression_rate must be positive, got {min_compression_rate!r}"
            )
        self.rank_r = rank
        self.start_iter = start_iter
        self.warm_start = warm_start
        self.min_compression_rate = float(min_compression_rate)
        self.state = PowerSGDState()

    def options(self) -> dict[str, Any]:
        return {"rank": self.rank_r, "start_iter": self.start_iter, "warm_start": self.warm_start}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "powersgd": self.state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = upgrade_state_dict(state)
        super().load_state_dict(state)
        self.state.load_state_dict(state["powersgd"])

    def plan(self, shapes: Shapes) -> list[tuple[int, int, int] | None]:
        """Per tensor: ``(n, m, r)`` if it is compressed, else None."""
        plan: list[tuple[int, int, int] | None] = []
        for shape in shapes:
            if len(shape) < 2:
                plan.append(None)
                continue
            n, m = shape[0], math.prod(shape[1:])
            r = min(n, m, self.rank_r)
            plan.append((n, m, r) if (n + m) * r * self.min_compression_rate < n * m else None)
        return plan

    def expected_nbytes(self, context: BucketContext) -> int:
        total = 0
        for shape, entry in zip(context.shapes, self.plan(context.shapes), strict=True):
            total += 4 * (math.prod(shape) if entry is None else (entry[0] + entry[1]) * entry[2])
        return total

    @staticmethod
    def initial_q(seed: int, key: str, index: int, step: int, m: int, r: int) -> torch.Tensor:
        """A fresh orthonormal ``Q`` (``m x r``) for tensor ``index`` of bucket ``key`` at ``step``."""
        # the same seed on every rank: Q must be identical everywhere for P = sum_w M_w Q to mean anything
        mixed = zlib.crc32(f"{seed}:{key}:{index}:{step}".encode())
        return _orthogonalise(torch.randn(m, r, generator=torch.Generator().manual_seed(mixed)))

    @torch.no_grad()
    def reduce(self, tensor: torch.Tensor, context: BucketContext, exchange: Exchange) -> torch.Tensor:
        flat, key, shapes = tensor, context.key, context.shapes
        step = self.state.next_step(key)
        if step < self.start_iter:
            return exchange.allreduce_(flat, "powersgd warm-up (uncompressed)")
        residual = self.state.residual(key, flat)
        kept = self.state.qs.setdefault(key, {})
        v = flat + residual
        spans, plan = parameter_spans(shapes), self.plan(shapes)
        dense = [v[a:b] for (a, b), entry in zip(spans, plan, strict=True) if entry is None]
        matrices, qs = [], []
        for index, ((a, b), entry) in enumerate(zip(spans, plan, strict=True)):
            if entry is None:
                continue
            n, m, r = entry
            matrices.append((index, v[a:b].view(n, m)))
            if self.warm_start and index in kept:
                qs.append(_orthogonalise(kept[index]))
            else:  # drawn on the host (the same on every rank), copied without a synchronisation
                qs.append(to_device(self.initial_q(context.seed, key, index, step, m, r), v.device))
        # exchange 1: the uncompressed tensors and every P = M Q, in one allreduce
        ps = [matrix @ q for (_, matrix), q in zip(matrices, qs, strict=True)]  # (n, r) each
        first = torch.cat([t.reshape(-1) for t in dense + ps]) if dense or ps else v.new_zeros(0)
        exchange.allreduce_(first, "powersgd P and uncompressed tensors")
        out = torch.empty_like(v)
        offset = 0
        for (a, b), entry in zip(spans, plan, strict=True):
            if entry is None:
                out[a:b] = first[offset : offset + b - a]
                offset += b - a
        summed_ps = []
        for p in ps:
            summed_ps.append(_orthogonalise(first[offset : offset + p.numel()].view_as(p)))
            offset += p.numel()
        # exchange 2: every Q = M^T P
        new_qs = [matrix.T @ p for (_, matrix), p in zip(matrices, summed_ps, strict=True)]  # (m, r) each
        second = torch.cat([q.reshape(-1) for q in new_qs]) if new_qs else v.new_zeros(0)
        exchange.allreduce_(second, "powersgd Q")
        offset = 0
        new_residual = torch.zeros_like(v)
        for ((index, matrix), p), q in zip(zip(matrices, summed_ps, strict=True), new_qs, strict=True):
            summed_q = second[offset : offset + q.numel()].view_as(q)
            offset += q.numel()
            a, b = spans[index]
            approximation = p @ summed_q.T  # sum over ranks of the rank-r approximations, (n, m)
            out[a:b] = approximation.reshape(-1)
            new_residual[a:b] = (matrix - approximation / exchange.world_size).reshape(-1)
            kept[index] = summed_q.clone()
        residual.copy_(new_residual)
        flat.copy_(out)
        return flat
