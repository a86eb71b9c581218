"""The codec contract: a pure :class:`Codec`, the context it is told, payloads and their bytes.

**Codec** -- ``encode(tensor, context) -> Payload`` and ``decode(payload, context) -> tensor``, *pure*:
neither changes any state, so any holder of the same codec and context decodes a payload (a peer, a parameter
server). ``tensor`` is one flat float32 bucket (several parameters' gradients back to back). Everything a
codec needs beyond the tensor is explicit: its settings at construction (``density``, ``threshold``), the
rest in the :class:`BucketContext` the caller passes -- the bucket's ``key`` and parameter ``shapes``
(per-tensor scales, PowerSGD's matrices), ``world_size`` (the casts divide by ``R``), ``seed`` (shared by
every rank: random-k's index sets, PowerSGD's first ``Q``), ``step`` (random-k's draw, DGC's warm-up) and
``generator`` (this rank's random stream for stochastic rounding). One property says how payloads travel:
``summable`` -- payloads of different ranks add element-wise, so they are allreduced in compressed form
and decoded once -- otherwise every rank's packed payload is all-gathered and each is decoded and added
(:data:`Codec.wire` gives the byte format). :class:`CollectiveCodec` is the one other kind: a codec that
needs more than one exchange (PowerSGD: allreduces of ``P`` and ``Q``) provides
``reduce(tensor, context, exchange)`` instead of ``encode``/``decode``.

**Memory as wrappers** (:mod:`.memory`), each a Codec around a Codec with its state in a class of its own,
updated by ``encode`` (``decode`` stays the inner codec's, pure):

* :class:`~.memory.ErrorFeedback` (:class:`~.memory.ErrorFeedbackState`: residual and step count per
  bucket): ``v = g + e``, send ``encode(v)``, keep ``e' = v - decode(encode(v))``;
* :class:`~.memory.MomentumCorrection` (:class:`~.memory.MomentumState`: velocity per bucket): encode
  ``u <- m u + g`` instead of ``g`` (DGC, 1-bit with momentum); the optimizer must then have no momentum
  of its own: :func:`~.memory.check_optimizer` says so, before any process starts;
* :class:`~.memory.RandomStream` (:class:`~.memory.RandomStreamState`: this rank's generator): hands the
  stochastic codecs (TernGrad, QSGD) their draws through ``context.generator``.

PowerSGD keeps its residuals and ``Q`` in its own :class:`~.powersgd.PowerSGDState`. Every state's
``state_dict`` holds only tensors and plain values (a ``weights_only`` checkpoint); the stack's
``state_dict`` gathers them. :func:`distlearn.comm.compression.create_compressor` builds the stack of a
name (e.g. ``"dgc"``: ``MomentumCorrection(ErrorFeedback(DGCSparsifier))``).

**Adapters**: ONE codec object serves all three (each builds the context from what it knows):

* the gradient bucketer: :class:`~.reducer.CompressedReducer`, a :class:`distlearn.comm.reducers.Reducer`
  over :func:`~.exchange.reduce_bucket` (allreduce or all-gather, bytes counted by
  :class:`~.exchange.Exchange`);
* the parameter-server push: :func:`~.push.encode_push` on the worker, :func:`~.push.decode_push` on the
  server (:func:`~.push.create_push_codec` refuses codecs that need every rank at once);
* DDP comm hooks: :func:`distlearn.comm.ddp_hooks.compression_ddp_comm_hook`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch

from distlearn.errors import ConfigError

__all__ = [
    "BucketContext",
    "Codec",
    "CollectiveCodec",
    "Compressor",
    "Payload",
    "WireFormat",
    "bytes_to_payload",
    "pack_bits",
    "payload_to_bytes",
    "span_index",
    "stream_seed",
    "to_device",
    "unpack_bits",
]

Shapes = Sequence[torch.Size | tuple[int, ...]]


# -- bit packing ----------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (each ``< 2**bits``) into bytes, ``8 // bits`` codes per byte, first code in
    the lowest bits. ``bits`` is 1, 2, 4 or 8; the result has ``ceil(n * bits / 8)`` bytes."""
    if bits not in (1, 2, 4, 8):
        raise ConfigError(f"pack_bits: bits must be 1, 2, 4 or 8, got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    per_byte = 8 // bits
    padding = (-codes.numel()) % per_byte
    if padding:
        codes = torch.cat([codes, codes.new_zeros(padding)])
    grouped = codes.view(-1, per_byte)  # (bytes, codes per byte)
    packed = grouped[:, 0].clone()
    for position in range(1, per_byte):  # at most 8 cheap uint8 passes, no wider integers
        packed |= grouped[:, position] << (position * bits)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of ``pack_bits(codes, bits)``, as ``uint8``."""
    if bits not in (1, 2, 4, 8):
        raise ConfigError(f"unpack_bits: bits must be 1, 2, 4 or 8, got {bits}")
    if bits == 8:
        return packed[:count].clone()
    mask = (1 << bits) - 1
    per_byte = 8 // bits
    # (bytes, codes per byte)
    codes = torch.empty(packed.numel(), per_byte, dtype=torch.uint8, device=packed.device)
    for position in range(per_byte):
        torch.bitwise_and(packed >> (position * bits), mask, out=codes[:, position])
    return codes.reshape(-1)[:count].clone()


# -- payloads ---------------------------------------------------------------------------------------------


@dataclass
class Payload:
    """What one rank sends for one bucket: named tensors (packed codes, scales, indices, values)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # known to every rank; never sent

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32]


def payload_to_bytes(tensors: Sequence[torch.Tensor], *, header: bool) -> torch.Tensor:
    """One ``uint8`` vector holding ``tensors`` back to back (their raw bytes).

    ``header=True`` prefixes the element counts (int32 each) for payloads whose sizes vary between ranks
    and steps; fixed-size payloads omit it (the receiver computes the sizes from the bucket's length).
    """
    parts = []
    if header:
        device = tensors[0].device if tensors else torch.device("cpu")
        counts = to_device(torch.tensor([t.numel() for t in tensors], dtype=torch.int32), device)
        parts.append(counts.view(torch.uint8))
    for t in tensors:
        parts.append(t.contiguous().reshape(-1).view(torch.uint8))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def bytes_to_payload(
    buffer: torch.Tensor, dtypes: Sequence[torch.dtype], counts: Sequence[int] | None
) -> list[torch.Tensor]:
    """Inverse of :func:`payload_to_bytes` (``counts`` None: read them from the header).

    A payload of one tensor with a header needs no look at it: its count follows from the buffer's length
    (a host read of a device buffer is a synchronisation; with several tensors the header is read).
    """
    offset = 0
    if counts is None:
        header_bytes = 4 * len(dtypes)
        if len(dtypes) == 1:
            counts = [(buffer.numel() - header_bytes) // torch.empty(0, dtype=dtypes[0]).element_size()]
        else:  # a synchronisation per payload on a GPU (no codec of ours sends several variable tensors)
            counts = buffer[:header_bytes].clone().view(torch.int32).tolist()
        offset = header_bytes
    tensors = []
    for dtype, count in zip(dtypes, counts, strict=True):
        size = count * torch.empty(0, dtype=dtype).element_size()
        tensors.append(buffer[offset : offset + size].clone().view(dtype))
        offset += size
    return tensors


# -- what a codec is told --------------------------------------------------------------------------------


def stream_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank`` 's random stream for stochastic rounding: independent draws per rank,
    the same draws when a run is repeated with ``seed``."""
    return 1_000_003 * seed + 7919 * rank + 11


@dataclass(frozen=True)
class BucketContext:
    """What a codec is told about a bucket besides its values (see the module docstring).

    Adapters set ``key``, ``shapes``, ``world_size``, ``seed`` and ``stream_seed``; the memory wrappers set
    ``step`` (:class:`~.memory.ErrorFeedback`) and ``generator`` (:class:`~.memory.RandomStream`).

    Attributes:
        key: the bucket's name, stable across steps and ranks (its index in the bucket plan).
        shapes: the shapes of the parameters laid out back to back in the flat tensor.
        world_size: ``R``, the ranks whose payloads are summed.
        seed: the run's seed, the same on every rank.
        stream_seed: the seed of this rank's random stream (:func:`stream_seed`).
        step: how many times this bucket has been encoded before.
        generator: this rank's random stream, for codecs that round stochastically.
    """

    key: str
    shapes: tuple[tuple[int, ...], ...]
    world_size: int = 1
    seed: int = 0
    stream_seed: int = 0
    step: int = 0
    generator: torch.Generator | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(tuple(int(n) for n in s) for s in self.shapes))

    @cached_property
    def numel(self) -> int:
        """Elements of the flat bucket."""
        return sum(math.prod(shape) for shape in self.shapes)


@dataclass(frozen=True)
class WireFormat:
    """How a payload becomes bytes: its tensors' ``names`` and ``dtypes`` in order, and whether every rank's
    payload for one bucket and step has the same size (``same_size``: no length exchange, no header)."""

    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    same_size: bool = True


# -- the contract -----------------------------------------------------------------------------------------


class Codec:
    """Base class and contract of a gradient codec (see the module docstring): pure encode and decode.

    Subclasses set ``name``, ``summable`` and ``wire`` and implement :meth:`encode` and :meth:`decode`.
    """

    name: ClassVar[str] = "codec"
    summable: ClassVar[bool] = False
    wire: ClassVar[WireFormat] = WireFormat((), ())

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        """The payload standing for ``tensor`` (a flat float32 bucket laid out as ``context.shapes``)."""
        raise NotImplementedError

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        """The dense flat tensor (``context.numel`` elements) that ``payload`` stands for."""
        raise NotImplementedError

    def expected_nbytes(self, context: BucketContext) -> int | None:
        """Payload bytes for a bucket laid out as ``context.shapes`` (``None`` when it varies)."""
        return None

    def options(self) -> dict[str, Any]:
        """The codec's settings, for summaries and benchmark tables."""
        return {}

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({settings})" if settings else self.name

    @property
    def handles_momentum(self) -> bool:
        """Deprecated (train.py's validation until it calls :func:`~.memory.check_optimizer`): whether the
        stack applies momentum itself (holds a :class:`~.memory.MomentumCorrection`)."""
        return False

    # -- checkpoints: a pure codec has no state, only its name (a wrapper adds its state) --------------------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(
                f"the checkpoint's compression state is for {state.get('name')!r}, this run uses "
                f"{self.name!r}; resume with the same --compression"
            )


class CollectiveCodec(Codec):
    """A codec that needs more than one exchange (PowerSGD): :meth:`reduce` replaces encode and decode."""

    def reduce(self, tensor: torch.Tensor, context: BucketContext, exchange: Any) -> torch.Tensor:
        """Replace ``tensor`` by the sum over the ranks of what they stand for (in place) and return it;
        ``exchange`` is an :class:`~.exchange.Exchange` (its collectives count the bytes)."""
        raise NotImplementedError

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        raise NotImplementedError(f"{self.name} needs several exchanges; use reduce()")

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} needs several exchanges; use reduce()")


Compressor = Codec
"""The contract's former name, kept for callers that annotate with it."""


# -- option checks ------------------------------------------------------------------------------------------


def check_fraction(name: str, value: float, what: str) -> float:
    """``value`` as a float in (0, 1], else a ConfigError naming the option."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= 1
        or math.isnan(value)
    ):
        raise ConfigError(
            f"{what}: {name} must be in (0, 1], got {value!r}; e.g. 0.001 keeps 0.1% of the values"
        )
    return float(value)


def check_positive(name: str, value: float, what: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ConfigError(f"{what}: {name} must be positive, got {value!r}")
    if integer and int(value) != value:
        raise ConfigError(f"{what}: {name} must be an integer, got {value!r}")
    return value


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor``, built on the host, on ``device`` without a host synchronisation: on CUDA it is staged in
    pinned memory and copied asynchronously on the current stream (a plain copy from pageable memory
    synchronises); on the CPU it is returned as it is."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@functools.lru_cache(maxsize=256)
def _span_index(shapes: tuple[tuple[int, ...], ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [math.prod(shape) for shape in shapes]
    counts = torch.tensor(lengths, dtype=torch.int64)
    index = torch.repeat_interleave(torch.arange(len(lengths)), counts, output_size=sum(lengths))
    return to_device(index, device), to_device(counts.to(torch.float64), device)


def span_index(shapes: Shapes, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """For a bucket laid out as ``shapes``: the parameter each element belongs to (int64, one per element)
    and each parameter's element count (float64), on ``device``. Built once per layout and device (cached;
    constants, not state), so per-tensor reductions and expansions are single tensor operations
    (``scatter_reduce`` over the index, ``values[index]``) with no loop and no host synchronisation."""
    key = tuple(tuple(int(n) for n in shape) for shape in shapes)
    return _span_index(key, str(torch.device(device)))


def parameter_spans(shapes: Shapes) -> list[tuple[int, int]]:
    """``(start, stop)`` of each parameter inside its bucket's flat vector."""
    spans, start = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        spans.append((start, start + numel))
        start += numel
    return spans
