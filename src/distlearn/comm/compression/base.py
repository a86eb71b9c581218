"""The Compressor contract, its residual state, bit packing, and the exchange that counts bytes on the wire.

A *codec* turns one gradient bucket (a flat float32 vector holding several parameters' gradients back to
back) into a small *payload* and back. Every codec here implements :class:`Compressor`:

* :meth:`Compressor.encode` ``(key, flat, shapes) -> Payload``: compress this rank's bucket ``key``; codecs
  with error feedback first add the bucket's residual ``e`` and keep ``e' = (g + e) - decode(payload)``,
  exactly what was not sent, for the next step;
* :meth:`Compressor.decode` ``(payload, numel, shapes) -> Tensor``: the dense vector a payload stands for;
* :meth:`Compressor.reduce` ``(key, flat, shapes, exchange)``: replace ``flat`` in place by the *sum* over
  the ranks of what they sent (the caller divides by ``R``, as for every :mod:`distlearn.comm.reducers`
  reducer). The default implementation picks the exchange that fits the codec:

  - ``linear = True`` (the casts, random-k with a shared index set): payloads of different ranks can be
    added element-wise, so they are **allreduced** in their compressed form and decoded once;
  - otherwise (sign bits, ternary or quantised codes, indices + values) every rank's packed payload is
    **all-gathered** as one byte vector and each is decoded and added locally.

  PowerSGD overrides it (two allreduces, of ``P`` and of ``Q``).

State (residuals, momentum, PowerSGD's ``Q``, random generators, step counters) lives in a
:class:`CompressorState` keyed by bucket; :meth:`Compressor.state_dict` holds only tensors and plain values,
so it goes into a ``weights_only`` checkpoint.

Bytes on the wire: :class:`Exchange` counts, at each collective, the payload bytes *this rank sends*: for an
allreduce of ``n`` bytes on ``R`` ranks the ``2 (R - 1) / R n`` of gloo's ring (the same convention as
:class:`distlearn.comm.reducers.BackendReducer`), for an all-gather of a ``b``-byte payload the ``(R - 1) b``
of a ring all-gather (including padding to the largest payload and the small length exchange of codecs
with variable-size payloads). Counted from the tensors actually handed to ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from distlearn.errors import CommError, ConfigError

__all__ = [
    "Compressor",
    "CompressorState",
    "Exchange",
    "Payload",
    "pack_bits",
    "unpack_bits",
    "payload_to_bytes",
    "bytes_to_payload",
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
    codes = torch.empty(packed.numel(), per_byte, dtype=torch.uint8)  # (bytes, codes per byte)
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
        counts = torch.tensor([t.numel() for t in tensors], dtype=torch.int32)
        parts.append(counts.view(torch.uint8))
    for t in tensors:
        parts.append(t.contiguous().reshape(-1).view(torch.uint8))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def bytes_to_payload(
    buffer: torch.Tensor, dtypes: Sequence[torch.dtype], counts: Sequence[int] | None
) -> list[torch.Tensor]:
    """Inverse of :func:`payload_to_bytes` (``counts`` None: read them from the header)."""
    offset = 0
    if counts is None:
        header_bytes = 4 * len(dtypes)
        counts = buffer[:header_bytes].clone().view(torch.int32).tolist()
        offset = header_bytes
    tensors = []
    for dtype, count in zip(dtypes, counts, strict=True):
        size = count * torch.empty(0, dtype=dtype).element_size()
        tensors.append(buffer[offset : offset + size].clone().view(dtype))
        offset += size
    return tensors


# -- state ------------------------------------------------------------------------------------------------


class CompressorState:
    """Per-bucket memory of a codec: ``tensors[key][name]`` (residuals, momentum, ``Q``) and ``counters``.

    ``key`` is the bucket's index in the strategy's bucket plan (or a DDP bucket's index), so a checkpoint
    restores each residual to the bucket it came from.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.counters: dict[str, int] = {}

    def get(self, key: str, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` of bucket ``key``; created as zeros shaped like ``like`` on first use."""
        bucket = self.tensors.setdefault(key, {})
        tensor = bucket.get(name)
        if tensor is None:
            if like is None:
                raise KeyError(f"no {name!r} state for bucket {key!r}")
            tensor = bucket[name] = torch.zeros_like(like)
        elif like is not None and tensor.shape != like.shape:
            raise ConfigError(
                f"compressor state {name!r} of bucket {key!r} has shape {tuple(tensor.shape)} but the bucket "
                f"now has {tuple(like.shape)}: the checkpoint belongs to a different model or bucket size"
            )
        return tensor

    def put(self, key: str, name: str, tensor: torch.Tensor) -> None:
        self.tensors.setdefault(key, {})[name] = tensor

    def has(self, key: str, name: str) -> bool:
        return name in self.tensors.get(key, {})

    def step(self, key: str) -> int:
        """How many times bucket ``key`` has been encoded before (then counts this one)."""
        count = self.counters.get(key, 0)
        self.counters[key] = count + 1
        return count

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {k: {n: t.clone() for n, t in v.items()} for k, v in self.tensors.items()},
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = {k: {n: t.clone() for n, t in v.items()} for k, v in state.get("tensors", {}).items()}
        self.counters = {str(k): int(v) for k, v in state.get("counters", {}).items()}


# -- exchange ---------------------------------------------------------------------------------------------


class Exchange:
    """Collectives on ``group`` with a deadline, counting the bytes this rank sends (see the module doc)."""

    def __init__(self, group: Any = None, *, timeout_s: float = 300.0) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.bytes_sent = 0
        self.messages = 0  # point-to-point messages of a ring implementation (alpha terms of the cost model)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def allreduce_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place."""
        size = self.world_size
        if size == 1 or tensor.numel() == 0:
            return tensor
        self.bytes_sent += (2 * (size - 1) * tensor.numel() // size) * tensor.element_size()
        self.messages += 2 * (size - 1)
        self._wait(dist.all_reduce(tensor, group=self.group, async_op=True), f"allreduce of {what}")
        return tensor

    def all_gather_bytes(self, payload: torch.Tensor, what: str, *, same_size: bool) -> list[torch.Tensor]:
        """Every rank's ``uint8`` payload (this rank's included), in rank order.

        ``same_size=False`` first all-gathers the lengths and pads every payload to the largest.
        """
        size = self.world_size
        if size == 1:
            return [payload]
        lengths = [payload.numel()] * size
        if not same_size:
            mine = torch.tensor([payload.numel()], dtype=torch.int64)
            gathered = [torch.empty_like(mine) for _ in range(size)]
            self.bytes_sent += (size - 1) * mine.numel() * mine.element_size()
            self.messages += size - 1
            self._wait(dist.all_gather(gathered, mine, group=self.group, async_op=True), f"lengths of {what}")
            lengths = [int(t) for t in gathered]
            longest = max(lengths)
            if payload.numel() < longest:
                payload = torch.cat([payload, payload.new_zeros(longest - payload.numel())])
        outputs = [torch.empty_like(payload) for _ in range(size)]
        self.bytes_sent += (size - 1) * payload.numel()
        self.messages += size - 1
        self._wait(
            dist.all_gather(outputs, payload, group=self.group, async_op=True), f"all-gather of {what}"
        )
        return [out[:length] for out, length in zip(outputs, lengths, strict=True)]

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as error:  # gloo raises RuntimeError on a timeout or a closed connection
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CommError(
                f"rank {self.rank}: compressed gradient exchange ({what}) did not complete within "
                f"{self.timeout_s:g} s: {first}; a peer may have died or be stuck"
            ) from error


# -- the contract -----------------------------------------------------------------------------------------


class Compressor:
    """Base class and contract of a gradient codec (see the module docstring).

    Subclasses set ``name``, ``linear`` (payloads can be summed: exchanged by allreduce),
    ``fixed_size`` (payload size depends only on the bucket's length) and ``payload_dtypes`` (the dtypes of
    :meth:`encode`'s tensors, in order, for the byte format), and implement :meth:`encode` and
    :meth:`decode`. ``error_feedback`` says whether the codec keeps a residual; ``handles_momentum`` that it
    applies momentum itself (DGC), so the optimizer must not.
    """

    name: ClassVar[str] = "base"
    linear: ClassVar[bool] = False
    fixed_size: ClassVar[bool] = True
    error_feedback: ClassVar[bool] = False
    handles_momentum: ClassVar[bool] = False
    payload_names: ClassVar[tuple[str, ...]] = ()
    payload_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()

    def __init__(self) -> None:
        self.state = CompressorState()
        self.seed = 0
        self.rank = 0
        self.world_size = 1

    # -- configuration -------------------------------------------------------------------------------------
    def bind(self, *, rank: int, world_size: int, seed: int = 0) -> None:
        """Tell the codec where it runs (random codecs seed per rank, DGC scales its clipping by ``R``)."""
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def options(self) -> dict[str, Any]:
        """The codec's settings, for summaries and benchmark tables."""
        return {}

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({settings})" if settings else self.name

    # -- the codec -------------------------------------------------------------------------------------
    def encode(self, key: str, flat: torch.Tensor, shapes: Shapes) -> Payload:
        raise NotImplementedError

    def decode(self, payload: Payload, numel: int, shapes: Shapes) -> torch.Tensor:
        raise NotImplementedError

    def expected_nbytes(self, numel: int, shapes: Shapes) -> int | None:
        """Payload bytes for a bucket of ``numel`` elements (``None`` when it varies)."""
        return None

    # -- the exchange ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce(self, key: str, flat: torch.Tensor, shapes: Shapes, exchange: Exchange) -> torch.Tensor:
        """Replace ``flat`` by the sum over ranks of the decoded payloads (in place) and return it."""
        payload = self.encode(key, flat, shapes)
        if self.linear:
            for name in self.payload_names:
                exchange.allreduce_(payload.tensors[name], f"{self.name} {name}")
            flat.copy_(self.decode(payload, flat.numel(), shapes))
            return flat
        wire = payload_to_bytes([payload.tensors[n] for n in self.payload_names], header=not self.fixed_size)
        received = exchange.all_gather_bytes(wire, f"{self.name} payload", same_size=self.fixed_size)
        counts = None if not self.fixed_size else self._counts(payload)
        total = torch.zeros_like(flat)
        for buffer in received:
            tensors = bytes_to_payload(buffer, self.payload_dtypes, counts)
            other = Payload(dict(zip(self.payload_names, tensors, strict=True)), dict(payload.meta))
            total += self.decode(other, flat.numel(), shapes)
        flat.copy_(total)
        return flat

    @staticmethod
    def _counts(payload: Payload) -> list[int]:
        return [t.numel() for t in payload.tensors.values()]

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(
                f"the checkpoint's compression state is for {state.get('name')!r}, this run uses "
                f"{self.name!r}; "
                "resume with the same --compression"
            )
        self.state.load_state_dict(state["state"])


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


def parameter_spans(shapes: Shapes) -> list[tuple[int, int]]:
    """``(start, stop)`` of each parameter inside its bucket's flat vector."""
    spans, start = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        spans.append((start, start + numel))
        start += numel
    return spans
