"""Half-precision casts: fp16 and bf16, the baseline every library has.

Each rank sends ``cast(g / R)`` (2 bytes per element instead of 4) and the casts are **allreduced** in
half precision (a cast is linear up to rounding, so payloads add). Dividing by ``R`` before the cast, as
torch's ``fp16_compress_hook`` does, keeps the sum of ``R`` gradients inside fp16's range (max 65504); the
decoder multiplies back, so the exchange returns the sum like every reducer (``R`` is
``context.world_size``).

Error: fp16 rounds to 11 significant bits (relative error <= 2**-11 for normal numbers; values below
6.1e-5 lose precision, below 6e-8 flush to zero), bf16 to 8 bits (<= 2**-8) with float32's range. Neither
keeps a residual. Compression ratio 2x.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from distlearn.comm.compression.base import BucketContext, Codec, Payload, WireFormat

__all__ = ["BF16Cast", "FP16Cast"]


class _Cast(Codec):
    summable = True
    dtype: ClassVar[torch.dtype] = torch.float16

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        return Payload({"values": (tensor / context.world_size).to(self.dtype)})

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        return payload.tensors["values"].to(torch.float32) * context.world_size

    def expected_nbytes(self, context: BucketContext) -> int:
        return 2 * context.numel


class FP16Cast(_Cast):
    """IEEE half precision (5 exponent, 10 mantissa bits)."""

    name = "fp16"
    dtype = torch.float16
    wire = WireFormat(("values",), (torch.float16,))


class BF16Cast(_Cast):
    """bfloat16 (8 exponent, 7 mantissa bits): float32's range, less precision."""

    name = "bf16"
    dtype = torch.bfloat16
    wire = WireFormat(("values",), (torch.bfloat16,))
