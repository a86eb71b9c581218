"""Deep Gradient Compression (Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression: Reducing the
Communication Bandwidth for Distributed Training", ICLR 2018).

Top-k sparsification with residual (:mod:`.sparse`) plus the paper's four fixes that keep accuracy at
0.1% density, per bucket on each rank ``r`` at step ``t``:

1. **Local gradient clipping** (section 3.2): before accumulating, scale ``g`` so that its 2-norm is at most
   ``clip_norm * R**-1/2`` (the sum of ``R`` independent gradients then has norm about ``clip_norm``).
2. **Momentum correction** (section 3.1): accumulate the *velocity*, not the gradient:
   ``u <- m u + g``, ``v <- v + u``; the optimizer must then be plain SGD (the codec is the momentum).
3. **Sparsify**: send ``v`` on the top ``density`` fraction of ``|v|`` (index + value, all-gathered), and
4. **Momentum factor masking**: zero both ``v`` and ``u`` where sent (``v`` is the residual; stale momentum
   for just-sent coordinates would push them again).
5. **Warm-up** (section 3.3): the density falls exponentially from 25% to ``density`` over the first
   ``warmup_steps`` steps in ``warmup_stages`` equal stages (the paper: 75%, 93.75%, 98.4375%, 99.6%
   sparsity over 4 epochs, i.e. density ``0.25 * (density / 0.25) ** (j / stages)``).

Composition (``create_compressor("dgc")``): ``MomentumCorrection(ErrorFeedback(DGCSparsifier(...)),
momentum, clip_norm=..., mask_sent=True)`` -- 1 and 2 and 4's masking of ``u`` are
:class:`~.memory.MomentumCorrection`, the accumulation of ``v`` and its masking are
:class:`~.memory.ErrorFeedback` (``e' = v - decode(encode(v))`` is ``v`` with the sent coordinates zeroed),
3 and 5 are :class:`DGCSparsifier`.

Where we differ: the threshold is the exact top-k (``torch.topk``) rather than the paper's estimate from
a 0.1-1% sample (cheap enough on CPU for our buckets); clipping is per bucket, not over the whole model
when the model spans several buckets; weight decay is applied by the optimizer after the exchange rather
than added to ``g`` before the momentum.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distlearn.comm.compression.base import (
    BucketContext,
    Codec,
    Payload,
    WireFormat,
    check_fraction,
    check_positive,
)
from distlearn.comm.compression.sparse import keep_count, scatter_indexed
from distlearn.errors import ConfigError

__all__ = ["DGCSparsifier"]


class DGCSparsifier(Codec):
    """DGC's sparsification: the top ``density_at(context.step)`` fraction of ``|v|`` as (index, value) pairs.

    Args:
        density: final fraction of elements sent, in (0, 1] (paper: 0.001).
        warmup_steps: steps over which the density falls from 25% to ``density`` (0: no warm-up).
        warmup_stages: number of exponential stages of the warm-up (paper: 4).
    """

    name = "dgc"
    wire = WireFormat(("indices", "values"), (torch.int32, torch.float32))

    def __init__(self, *, density: float = 0.001, warmup_steps: int = 0, warmup_stages: int = 4) -> None:
        self.density = check_fraction("density", density, "dgc")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"dgc: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        check_positive("warmup_stages", warmup_stages, "dgc", integer=True)
        self.warmup_steps = warmup_steps
        self.warmup_stages = int(warmup_stages)

    def options(self) -> dict[str, Any]:
        return {"density": self.density, "warmup_steps": self.warmup_steps}

    def density_at(self, step: int) -> float:
        """The warm-up schedule: 25% down to ``density`` in ``warmup_stages`` geometric stages."""
        start = 0.25
        if step >= self.warmup_steps or self.density >= start:
            return self.density
        stage = math.floor(step * self.warmup_stages / self.warmup_steps)
        return start * (self.density / start) ** (stage / self.warmup_stages)

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        k = keep_count(tensor.numel(), self.density_at(context.step))
        indices = torch.topk(tensor.abs(), k, sorted=False).indices
        return Payload({"indices": indices.to(torch.int32), "values": tensor[indices].clone()})

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        return scatter_indexed(payload, context.numel)
