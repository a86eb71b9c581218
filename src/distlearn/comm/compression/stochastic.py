"""Unbiased stochastic quantisation: TernGrad (Wen et al., NeurIPS 2017) and QSGD (Alistarh et al.,
NeurIPS 2017). Both round each element up or down at random with the probabilities that make the
quantised gradient an unbiased estimate, ``E[Q(g)] = g``, and keep no residual.

**TernGrad** ("TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep Learning"): per
parameter tensor (the paper's layer-wise scaling) with ``s = max_i |g_i|``,

    Q(g)_i = s * sign(g_i) * b_i,      b_i ~ Bernoulli(|g_i| / s),

three values ``{-s, 0, s}``, sent as 2-bit codes (4 per byte) plus ``s`` as float32: about 16x less. The
paper also clips each tensor to ``clip_sigma`` standard deviations before quantising (``c = 2.5``), which
lowers ``s`` and so the variance, at the price of a small bias; ``clip_sigma=None`` turns it off.

**QSGD** ("QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding"): with ``s`` levels,
each parameter tensor of the bucket is cut into chunks of ``chunk`` elements (the paper's "bucket size"
``d``, 512 in its experiments; a tensor's last chunk may be shorter, and no chunk spans two tensors, so a
tensor of small values beside one of large values keeps its own norms); for a chunk ``v``,

    Q_s(v)_i = ||v||_2 sign(v_i) l_i / s,    l_i = floor(s |v_i| / ||v||) + Bernoulli(frac(s |v_i| / ||v||))

so ``|Q_s(v)_i - v_i| <= ||v|| / s`` and ``E ||Q_s(v) - v||^2 <= min(n / s^2, sqrt(n) / s) ||v||^2``
(Lemma 3.1). We send ``sign * l + s`` in ``2 s + 1`` codes packed 2, 4 or 8 bits each (``s`` = 1, <= 7,
<= 127) plus one float32 norm per chunk: ``sum_t ceil(n_t / chunk)`` norms for tensors of ``n_t``
elements. Where we differ: the paper's Elias coding of the levels (its
``s = sqrt(n)`` regime) is not done; fixed-width codes keep the payload size known in advance.

Random draws come from ``context.generator``: this rank's ``torch.Generator``, which
:class:`~.memory.RandomStream` keeps (seeded from ``(seed, rank)``, saved in checkpoints), so the ranks'
draws are independent and a resumed run repeats the same draws (``create_compressor("qsgd")`` builds
``RandomStream(QSGD())``). The draws are made on the tensor's device with that device's generator
(:class:`~.memory.RandomStreamState` keeps one per device, seeded alike; a CUDA generator draws other
numbers than the CPU one, so a run on a GPU rounds differently from the same run on the CPU).

On a GPU nothing is read on the host: TernGrad's clipping bound ``c * std`` stays a per-tensor device
tensor (the same reduction as before, so the same bits), its scales are one ``scatter_reduce``
(``amax``) over the bucket's parameter index (:func:`~.base.span_index`), and both expand per element by
gathering through that index.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from distlearn.comm.compression.base import (
    BucketContext,
    Codec,
    Payload,
    WireFormat,
    check_positive,
    pack_bits,
    parameter_spans,
    span_index,
    to_device,
    unpack_bits,
)
from distlearn.errors import ConfigError

__all__ = ["QSGD", "TernGrad"]


def _generator(context: BucketContext, name: str) -> torch.Generator:
    if context.generator is None:
        raise ConfigError(
            f"{name} rounds stochastically and needs this rank's random stream in context.generator: wrap it "
            "in distlearn.comm.compression.memory.RandomStream (create_compressor does)"
        )
    return context.generator


class TernGrad(Codec):
    """Ternary ``{-s, 0, s}`` per tensor, ``s = max|g|``, unbiased stochastic rounding.

    Args:
        clip_sigma: clip each tensor to ``clip_sigma`` standard deviations first (paper: 2.5); None: off.
    """

    name = "terngrad"
    wire = WireFormat(("codes", "scales"), (torch.uint8, torch.float32))

    def __init__(self, *, clip_sigma: float | None = 2.5) -> None:
        if clip_sigma is not None:
            check_positive("clip_sigma", clip_sigma, "terngrad")
        self.clip_sigma = clip_sigma

    def options(self) -> dict[str, Any]:
        return {"clip_sigma": self.clip_sigma}

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        spans = parameter_spans(context.shapes)
        g = tensor.clone()
        if self.clip_sigma is not None:
            for a, b in spans:
                if b - a > 1:  # bound = c * std as a 0-d device tensor (no host read)
                    bound = self.clip_sigma * g[a:b].std()
                    g[a:b].clamp_(-bound, bound)
        index, _ = span_index(context.shapes, g.device)
        scales = g.new_zeros(len(spans), dtype=torch.float32).scatter_reduce_(0, index, g.abs(), "amax")
        per_element = scales[index]
        probability = torch.where(
            per_element > 0, g.abs() / per_element.clamp_min(1e-30), torch.zeros_like(g)
        )
        draws = torch.rand(g.numel(), generator=_generator(context, self.name), device=g.device)
        keep = draws < probability
        ternary = torch.sign(g) * keep  # -1, 0, 1
        return Payload({"codes": pack_bits((ternary + 1).to(torch.uint8), 2), "scales": scales})

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        ternary = unpack_bits(payload.tensors["codes"], 2, context.numel).to(torch.float32) - 1
        index, _ = span_index(context.shapes, ternary.device)
        return ternary * payload.tensors["scales"][index]

    def expected_nbytes(self, context: BucketContext) -> int:
        return (context.numel + 3) // 4 + 4 * len(context.shapes)


class QSGD(Codec):
    """QSGD with ``levels`` = ``s`` quantisation levels per sign and a 2-norm per chunk of ``chunk``.

    Args:
        levels: ``s`` in 1..127 (1 is ternary; 127 uses 8-bit codes).
        chunk: elements per norm (the paper's bucket size ``d``).
    """

    name = "qsgd"
    wire = WireFormat(("codes", "norms"), (torch.uint8, torch.float32))

    def __init__(self, *, levels: int = 4, chunk: int = 512) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ConfigError(f"qsgd: levels (s) must be an integer in 1..127, got {levels!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"qsgd: chunk must be a positive integer number of elements, got {chunk!r}")
        self.levels = levels
        self.chunk = chunk
        codes = 2 * levels + 1
        self.bits = next(b for b in (2, 4, 8) if codes <= 2**b)

    def options(self) -> dict[str, Any]:
        return {"levels": self.levels, "chunk": self.chunk, "bits": self.bits}

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        flat = tensor
        gather, place = _chunk_layout(_lengths(context, flat.numel()), self.chunk, str(flat.device))
        chunks = _padded(flat, gather, self.chunk).view(-1, self.chunk)  # (chunks, chunk): within one tensor
        norms = chunks.norm(dim=1).to(torch.float32)  # (chunks,)
        scaled = chunks.abs() / norms.clamp_min(1e-30).unsqueeze(1) * self.levels  # in [0, s]
        lower = scaled.floor()
        draws = torch.rand(scaled.shape, generator=_generator(context, self.name), device=scaled.device)
        up = draws < (scaled - lower)
        level = (lower + up).clamp_max(self.levels)
        signed = (torch.sign(chunks) * level).reshape(-1)
        signed = signed[: flat.numel()] if place is None else signed[place]
        codes = (signed + self.levels).to(torch.uint8)  # 0 .. 2s
        return Payload({"codes": pack_bits(codes, self.bits), "norms": norms})

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        numel = context.numel
        signed = unpack_bits(payload.tensors["codes"], self.bits, numel).to(torch.float32) - self.levels
        gather, place = _chunk_layout(_lengths(context, numel), self.chunk, str(signed.device))
        padded = _padded(signed, gather, self.chunk).view(-1, self.chunk)
        out = (padded * payload.tensors["norms"].unsqueeze(1) / self.levels).reshape(-1)
        return out[:numel] if place is None else out[place]

    def expected_nbytes(self, context: BucketContext) -> int:
        chunks = sum(math.ceil(n / self.chunk) for n in _lengths(context, context.numel))
        return (context.numel * self.bits + 7) // 8 + 4 * chunks


def _lengths(context: BucketContext, numel: int) -> tuple[int, ...]:
    """The element counts of the bucket's tensors; a bucket given without shapes is one tensor."""
    return tuple(math.prod(shape) for shape in context.shapes) if context.shapes else (numel,)


def _padded(flat: torch.Tensor, gather: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """``flat`` with each tensor padded by zeros to whole chunks (``gather`` from :func:`_chunk_layout`)."""
    if gather is None:  # one tensor: pad the end
        return torch.cat([flat, flat.new_zeros(-flat.numel() % chunk)])
    return torch.cat([flat, flat.new_zeros(1)])[gather]


@functools.lru_cache(maxsize=256)
def _chunk_layout(
    lengths: tuple[int, ...], chunk: int, device: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """QSGD's chunks within each tensor: ``gather`` picks, for each position of the padded layout (every
    tensor padded with zeros to a multiple of ``chunk``), its element of the flat bucket, or the zero put
    after it (index ``numel``); ``place`` is each element's position in the padded layout. Both are
    ``None`` for one tensor (the padding then sits at the end). Built once per layout and device, on the
    host, so encode and decode read nothing back from the device."""
    if len(lengths) <= 1:
        return None, None
    numel = sum(lengths)
    gather, place, start, position = [], [], 0, 0
    for n in lengths:
        padded = -(-n // chunk) * chunk
        gather.append(torch.arange(start, start + n))
        gather.append(torch.full((padded - n,), numel))
        place.append(torch.arange(position, position + n))
        start, position = start + n, position + padded
    return to_device(torch.cat(gather), device), to_device(torch.cat(place), device)
