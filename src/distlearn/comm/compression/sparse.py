"""Sparsification with residual accumulation: top-k and random-k (Stich, Cordonnier and Jaggi, "Sparsified
SGD with Memory", NeurIPS 2018; Aji and Heafield, "Sparse Communication for Distributed Gradient Descent",
EMNLP 2017).

Each rank adds its residual, ``v = g + e``, sends ``k = ceil(density * n)`` of the ``n`` elements of the
bucket and keeps the others for later:

    S = top_k(|v|)  (top-k)     or  S = k indices drawn uniformly without replacement  (random-k)
    sent = v restricted to S,    e' = v - sent                 (exactly the unsent elements)

* **top-k** sends each chosen element as an int32 index and a float32 value (8 bytes for every 4 of the
  dense gradient it replaces: ratio ``1 / (2 density)``); the index sets differ between ranks, so the
  payloads are all-gathered and scattered into a sum.
* **random-k** draws the *same* index set on every rank from a generator seeded by ``(seed, bucket, step)``,
  so no index is sent and the k values are simply **allreduced** (ratio ``1 / density``): the codec is
  linear. It is unbiased only with a ``n / k`` rescale; with memory (as here) the rescale is not needed
  and not applied (Stich et al.).

The codecs choose and send; the residual is :class:`~.memory.ErrorFeedback` around them, which also counts
the steps random-k draws with (``create_compressor("topk")`` builds ``ErrorFeedback(TopK(...))``).

Tuning: ``density`` in ``(0, 1]``; 0.001-0.01 with memory usually trains, with a learning-rate warm-up
helping at the lower end (see :mod:`.dgc` for the other tricks that make 0.1% work).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from distlearn.comm.compression.base import (
    BucketContext,
    Codec,
    Payload,
    WireFormat,
    check_fraction,
    to_device,
)

__all__ = ["RandomK", "TopK", "keep_count", "scatter_indexed"]


def keep_count(numel: int, density: float) -> int:
    """``k = ceil(density * n)``, at least 1 for a non-empty bucket."""
    return min(numel, max(1, math.ceil(density * numel))) if numel else 0


def scatter_indexed(payload: Payload, numel: int) -> torch.Tensor:
    """The dense vector of an (``indices``, ``values``) payload: zeros elsewhere (repeated indices add)."""
    values = payload.tensors["values"]
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    out.index_put_((payload.tensors["indices"].long(),), values, accumulate=True)
    return out


class TopK(Codec):
    """Send the ``density`` fraction of largest ``|v|`` as (index, value) pairs (``v = g + e`` under error
    feedback)."""

    name = "topk"
    wire = WireFormat(("indices", "values"), (torch.int32, torch.float32))

    def __init__(self, *, density: float = 0.01) -> None:
        self.density = check_fraction("density", density, "topk")

    def options(self) -> dict[str, Any]:
        return {"density": self.density}

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        indices = torch.topk(tensor.abs(), keep_count(tensor.numel(), self.density), sorted=False).indices
        values = tensor[indices]
        return Payload({"indices": indices.to(torch.int32), "values": values.to(torch.float32)})

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        return scatter_indexed(payload, context.numel)

    def expected_nbytes(self, context: BucketContext) -> int:
        return 8 * keep_count(context.numel, self.density)


class RandomK(Codec):
    """Send ``density`` of the elements, the same random index set on every rank (allreduced values): drawn
    from ``(context.seed, context.key, context.step)``."""

    name = "randomk"
    summable = True
    wire = WireFormat(("values",), (torch.float32,))

    def __init__(self, *, density: float = 0.01) -> None:
        self.density = check_fraction("density", density, "randomk")

    def options(self) -> dict[str, Any]:
        return {"density": self.density}

    def indices(self, seed: int, key: str, step: int, numel: int) -> torch.Tensor:
        """The index set of bucket ``key`` at ``step``: identical on every rank (a shared seed)."""
        # zlib.crc32, not hash(): Python salts str hashes per process, and every rank must draw the same set
        mixed = zlib.crc32(f"{seed}:{key}:{step}".encode())
        generator = torch.Generator().manual_seed(mixed)
        return torch.randperm(numel, generator=generator)[: keep_count(numel, self.density)]

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        # drawn on the host (the same set on every rank whatever its device), copied without a synchronisation
        drawn = self.indices(context.seed, context.key, context.step, tensor.numel())
        indices = to_device(drawn, tensor.device)
        return Payload({"values": tensor[indices].clone()}, {"indices": indices})

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        out = torch.zeros(context.numel, dtype=torch.float32, device=payload.tensors["values"].device)
        out[payload.meta["indices"]] = payload.tensors["values"]
        return out

    def expected_nbytes(self, context: BucketContext) -> int:
        return 4 * keep_count(context.numel, self.density)
