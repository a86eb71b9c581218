"""Count host synchronisations in a block of code: what keeps a GPU's queue from running ahead of Python.

A CUDA kernel launch returns at once; the host waits for the device only when it needs a value from it:
``tensor.item()``, ``float(tensor)``, ``int(tensor)``, ``if tensor:``, ``tensor.tolist()``, a copy to
the CPU, an operation whose output size depends on the values (``nonzero``, ``masked_select``, indexing
with a boolean mask, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``), or a copy
from pageable host memory. One such wait per tensor or per bucket in a gradient codec stalls the
pipeline of every step. :func:`count_syncs` counts them:

* on CUDA, with ``torch.cuda.set_sync_debug_mode("warn")``: PyTorch itself warns at every synchronising
  CUDA call, and each warning is counted (``SyncCounter.count``);
* everywhere (the CPU included, where nothing synchronises), with a ``torch.overrides.TorchFunctionMode``
  that sees every tensor operation and counts the ones above that would synchronise on a device (host reads
  of values and value-dependent sizes), so a CPU test catches a ``.item()`` that would stall a GPU.

The second count is ``SyncCounter.host_reads``; ``SyncCounter.count`` is the CUDA count on a CUDA device
and the host-read count elsewhere. ``SyncCounter.events`` names each one. What the CPU count cannot see: a
copy from pageable host memory to the device (``torch.tensor(values, device="cuda")``): only the CUDA run
sees those.

Example::

    with count_syncs(tensor.device) as syncs:
        payload = codec.encode(tensor, context)
    assert syncs.count == 0, syncs.events
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SyncCounter", "count_syncs"]

_HOST_READS = {
    torch.Tensor.item: "Tensor.item",
    torch.Tensor.tolist: "Tensor.tolist",
    torch.Tensor.__bool__: "bool(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__index__: "tensor as an index",
    torch.Tensor.numpy: "Tensor.numpy",
    torch.Tensor.cpu: "Tensor.cpu",
}
_VALUE_SIZED = {
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "argwhere",
    torch.Tensor.argwhere: "argwhere",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique_consecutive",
    torch.bincount: "bincount",
    torch.Tensor.bincount: "bincount",
}


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _host_read(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """What synchronising operation ``func(*args, **kwargs)`` is, or None."""
    name = _HOST_READS.get(func) or _VALUE_SIZED.get(func)
    if name is not None:
        return name
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
        return "indexing with a boolean mask" if _has_bool_index(args[1]) else None
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "where(condition) (nonzero)"
    if func in (torch.Tensor.to, torch.Tensor.copy_) and args and isinstance(args[0], torch.Tensor):
        source = args[1] if func is torch.Tensor.copy_ else args[0]
        target = args[0].device if func is torch.Tensor.copy_ else _target_device(args[1:], kwargs)
        if (
            isinstance(source, torch.Tensor)
            and target is not None
            and source.device.type != "cpu"
            and target.type == "cpu"
            and not kwargs.get("non_blocking", False)
        ):
            return f"copy from {source.device} to the host"
    return None


def _target_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    for value in (*args, kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            try:
                return torch.device(value)
            except RuntimeError:
                return None
    return None


class SyncCounter:
    """What :func:`count_syncs` saw: ``count`` (see the module docstring), ``host_reads`` (the operations
    that would synchronise on a device) and ``events`` (their names, in order)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host_reads = 0
        self.cuda_syncs = 0
        self.events: list[str] = []

    @property
    def count(self) -> int:
        return self.cuda_syncs if self.device.type == "cuda" else self.host_reads


class _Watch(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = _host_read(func, args, kwargs)
        if name is not None:
            self.counter.host_reads += 1
            self.counter.events.append(name)
        return func(*args, **kwargs)


@contextmanager
def count_syncs(device: torch.device | str = "cpu") -> Iterator[SyncCounter]:
    """Count the host synchronisations of the block (see the module docstring) for tensors on ``device``."""
    counter = SyncCounter(torch.device(device))
    cuda = counter.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode() if cuda else 0
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with _Watch(counter):
                yield counter
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchronizing" in str(warning.message).lower():
            counter.cuda_syncs += 1
            counter.events.append(f"CUDA: {str(warning.message).splitlines()[0]}")
        else:  # not ours: hand it on
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno, source=warning.source
            )
