"""Threshold quantisation with residuals (Strom, "Scalable Distributed DNN Training Using Commodity GPU
Cloud Computing", Interspeech 2015).

Each rank adds its residual to the new gradient, ``v = g + e``, and sends only the elements whose
magnitude reaches the threshold ``tau``, each as ``+tau`` or ``-tau``:

    sent_i = tau * sign(v_i)   if |v_i| >= tau,   else 0;          e' = v - sent

so a large value is sent over several steps (``tau`` at a time) and a small one waits in the residual until
it has grown to ``tau``. Nothing is lost: ``sum_t sent_t + e_T = sum_t g_t`` exactly.

Payload: Strom's 32-bit word per sent element, the index shifted left by one with the sign in the lowest
bit (``index << 1 | (v_i < 0)``), so its size varies from step to step; ranks first all-gather their
lengths, then the words (padded to the longest).

The codec sends ``+-tau`` for ``v``; the residual is :class:`~.memory.ErrorFeedback` around it
(``create_compressor("threshold")`` builds both).

On a GPU: encoding selects the chosen words (``masked_select``), whose number the device must tell the
host (the payload's size): one synchronisation per bucket, unavoidable for a variable-size payload, besides
the all-gather of the payloads' lengths (:class:`~.exchange.Exchange`). Decoding has none.

Tuning: ``tau`` sets the compression directly; too small sends most of the gradient, too large delays
everything. Strom tuned it per model; a value near the typical gradient magnitude times 2-5 is a start.
"""

from __future__ import annotations

import torch

from distlearn.comm.compression.base import BucketContext, Codec, Payload, WireFormat, check_positive

__all__ = ["StromThreshold"]


class StromThreshold(Codec):
    """Send ``+-tau`` where ``|v| >= tau`` (``v = g + e`` under error feedback), nothing elsewhere.

    Args:
        threshold: ``tau`` > 0.
    """

    name = "threshold"
    wire = WireFormat(("words",), (torch.int32,), same_size=False)

    def __init__(self, *, threshold: float = 1e-3) -> None:
        self.threshold = float(check_positive("threshold", threshold, "threshold compression"))

    def options(self) -> dict[str, float]:
        return {"threshold": self.threshold}

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        if tensor.numel() >= 2**30:
            raise ValueError("threshold compression packs an index in 31 bits: bucket too large")
        chosen = tensor.abs() >= self.threshold
        return Payload({"words": self._words(chosen, tensor)})

    def _words(self, chosen: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``index << 1 | (v < 0)`` for every chosen element, as int32, in index order."""
        codes = self.__dict__.get("_codes")  # 2i for every position: a cache of constants, not state
        if codes is None or codes.numel() < v.numel():
            codes = torch.arange(v.numel(), dtype=torch.int32, device=v.device) << 1
            self.__dict__["_codes"] = codes
        elif codes.device != v.device:
            codes = self.__dict__["_codes"] = codes.to(v.device)
        return torch.masked_select(codes[: v.numel()] | torch.signbit(v).to(torch.int32), chosen)

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        words = payload.tensors["words"]
        values = (words & 1).to(torch.float32).mul_(-2 * self.threshold).add_(self.threshold)  # +-tau
        out = torch.zeros(context.numel, dtype=torch.float32, device=words.device)
        out.index_put_(((words >> 1).to(torch.int64),), values)
        return out
