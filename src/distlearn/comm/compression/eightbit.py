"""8-bit approximation of gradients (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning",
ICLR 2016, arXiv:1511.04561, 2015): linear quantisation and the dynamic tree data type.

Each parameter tensor ``g`` of a bucket is scaled by its largest magnitude ``s = max_i |g_i|`` (sent as one
float32) and every element ``x = g_i / s`` in ``[-1, 1]`` is replaced by the nearest of 255 code values:

* ``int8-linear``: ``Q(x) = round(127 x) / 127``: a uniform grid, ``|x - Q(x)| <= 1 / 254``;
* ``int8-tree`` (Dettmers' *dynamic tree*): one sign bit, then ``e`` zero bits giving the decimal exponent
  ``10**-e`` (``e = 0..6``), an indicator bit 1, and ``6 - e`` bits of a linear fraction in ``(0.1, 1]``:
  magnitudes ``10**-e (0.1 + 0.9 (j + 1) / 2**(6 - e))``, ``j < 2**(6 - e)``, plus zero. Large values get
  64 levels between 0.1 and 1, small ones fewer but at a finer absolute scale, so the *relative* error
  stays small over six decades where the linear grid rounds everything below 1/254 to zero.

Payload: one byte per element plus 4 bytes per tensor (ratio just under 4x); all-gathered, because every
rank has its own scales. No residual (the paper has none).

Where we differ: the byte sent is the index of the value in the sorted code book (the same 256 values as
the paper's bit layout, in a different order), which makes decoding one table lookup.

On a GPU: the scales are one ``scatter_reduce`` (``amax``) over the bucket's parameter index
(:func:`~.base.span_index`) and are applied by gathering them per element, so no value is read on the
host; the code book and the lookup table are copied to each device once. The arithmetic is the one of the
per-tensor loop it replaces (``x = g * float32(1 / s)``), so the payload has the same bits.
"""

from __future__ import annotations

import torch

from distlearn.comm.compression.base import BucketContext, Codec, Payload, WireFormat, span_index, to_device

__all__ = ["DynamicTree8Bit", "Linear8Bit", "dynamic_tree_codebook"]


def dynamic_tree_codebook() -> torch.Tensor:
    """The sorted 255 values of Dettmers' dynamic tree type on ``[-1, 1]`` (+0 and -0 are one value)."""
    magnitudes = [0.0]
    for exponent in range(7):
        fraction_bits = 6 - exponent
        levels = 2**fraction_bits
        for j in range(levels):
            magnitudes.append(10.0**-exponent * (0.1 + 0.9 * (j + 1) / levels))
    positive = torch.tensor(sorted(set(magnitudes)), dtype=torch.float64)
    return torch.cat([-positive.flip(0)[:-1], positive]).to(torch.float32)  # (255,)


class _EightBit(Codec):
    wire = WireFormat(("codes", "scales"), (torch.uint8, torch.float32))

    def _quantise(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantise(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        flat = tensor
        index, _ = span_index(context.shapes, flat.device)
        # s = max |g| per tensor (0 for an empty one): exact in any order
        scales = flat.new_zeros(len(context.shapes), dtype=torch.float32)
        scales.scatter_reduce_(0, index, flat.abs().to(torch.float32), "amax")
        # x = g / s per tensor as g * float32(1 / s), 1 / s in double (s = 0: x = g = 0)
        inverse = torch.where(scales > 0, 1.0 / scales.double(), 1.0).to(torch.float32)
        x = flat * inverse[index]
        return Payload({"codes": self._quantise(x), "scales": scales})

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        out = self._dequantise(payload.tensors["codes"])
        index, _ = span_index(context.shapes, out.device)
        return out.mul_(payload.tensors["scales"][index])

    def expected_nbytes(self, context: BucketContext) -> int:
        return context.numel + 4 * len(context.shapes)


class Linear8Bit(_EightBit):
    """Linear 8-bit quantisation: ``round(127 g / max|g|)`` per tensor."""

    name = "int8-linear"

    def _quantise(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.round(x * 127) + 127).to(torch.uint8)  # codes 0..254

    def _dequantise(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.to(torch.float32) - 127) / 127


class DynamicTree8Bit(_EightBit):
    """Dettmers' dynamic tree 8-bit type: nearest of 255 values spread over six decades."""

    name = "int8-tree"

    def __init__(self) -> None:
        self.codebook = dynamic_tree_codebook()
        self.midpoints = (self.codebook[1:] + self.codebook[:-1]) / 2
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # constants

    def _quantise(self, x: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code value: how many midpoints lie below ``x`` (``searchsorted``).

        A binary search per element costs ~50 ns; instead the top 20 bits of ``x``'s float32 pattern
        (sign, exponent, 11 mantissa bits) pick a cell of width 2**-11 relative, and a table gives the
        number of midpoints below the cell. No cell holds two midpoints (checked when the table is
        built), so one comparison with the next midpoint finishes the count: exactly ``searchsorted``.
        """
        base, upper, _ = self._constants(x.device)
        cell = (x.contiguous().view(torch.int32) >> 12) & 0xFFFFF
        count = base[cell.to(torch.int64)]
        return count.add_(upper[count.to(torch.int64)] < x).to(torch.uint8)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The lookup table (:meth:`_lookup`) and the code book on ``device``, copied there once."""
        key = str(device)
        if key not in self._on_device:
            tables = (*self._lookup(), self.codebook)
            self._on_device[key] = tuple(to_device(t, device) for t in tables)  # type: ignore[assignment]
        return self._on_device[key]

    def _lookup(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None:
            prefixes = torch.arange(1 << 20, dtype=torch.int64) << 12
            ends = [(prefixes | tail).to(torch.int32).view(torch.float32) for tail in (0, 0xFFF)]
            low, high = torch.minimum(*ends), torch.maximum(*ends)
            below_low = torch.searchsorted(self.midpoints, low.contiguous())
            below_high = torch.searchsorted(self.midpoints, high.contiguous(), right=True)
            finite = torch.isfinite(low) & torch.isfinite(high)
            if bool(((below_high - below_low) > 1)[finite].any()):  # cannot happen for this code book
                raise AssertionError("int8-tree: a table cell holds two midpoints")
            upper = torch.cat([self.midpoints, torch.tensor([float("inf")])])  # the next midpoint, or inf
            self._table = (below_low.to(torch.int32), upper)
        return self._table

    def _dequantise(self, codes: torch.Tensor) -> torch.Tensor:
        return self._constants(codes.device)[2][codes.long()]
