"""Where a process computes: the device of ``--device auto|cpu|cuda``, its backend, and moving data onto it.

One device per process: under torchrun the process of local rank ``k`` (``LOCAL_RANK``, its place on its
machine) computes on ``cuda:k``, so ``--nproc-per-node`` should not exceed the machine's GPUs. ``auto`` is
``cuda:LOCAL_RANK`` where torch sees a CUDA device, else the CPU::

    device = resolve_device("auto")                  # cuda:0 on a GPU machine, cpu elsewhere
    backend_for(device)                              # "nccl" for a CUDA device, "gloo" for the CPU
    x, y = to_device((x, y), device)                 # pinned host memory, then a non-blocking copy

Training data stays in host memory; each batch is copied to the device on its own (:func:`to_device`):
through pinned (page-locked) memory, so the copy is a DMA transfer that does not block the host, and only
when the target is CUDA (for the CPU the batch is returned as it is: no copy, no pinning).

Checkpoints hold CPU tensors (:func:`to_host`), so a checkpoint written on a GPU loads on a machine without
one; the CUDA generator's state of this process's device is saved beside the CPU ones
(:func:`cuda_rng_state`, :func:`set_cuda_rng_state`: no-ops on the CPU).

torch APIs used: ``torch.cuda.is_available``, ``torch.cuda.device_count``, ``torch.cuda.set_device``
(before NCCL joins, see :func:`distlearn.launch.init_distributed`), ``Tensor.pin_memory`` and
``Tensor.to(device, non_blocking=True)``, ``torch.cuda.get_rng_state`` / ``set_rng_state``, and
``torch.use_deterministic_algorithms`` with the ``CUBLAS_WORKSPACE_CONFIG`` variable that cuBLAS needs for
reproducible matrix products (:func:`deterministic_settings`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from distlearn.errors import ConfigError

__all__ = [
    "DEVICE_CHOICES",
    "backend_for",
    "cuda_rng_state",
    "deterministic_settings",
    "env_local_rank",
    "module_device",
    "place_model",
    "resolve_device",
    "set_cuda_rng_state",
    "synchronize",
    "to_device",
    "to_host",
]

DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""The values of ``--device``."""

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's workspace setting for deterministic results (CUDA >= 10.2; torch refuses deterministic mode on
CUDA without it or ``:16:8``): set once, before the first matrix product, unless the user set it."""


def env_local_rank() -> int:
    """This process's ``LOCAL_RANK`` (torchrun sets it; 0 when unset)."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        raise ConfigError(
            f"LOCAL_RANK={value!r} is not an integer; it is torchrun's, leave it unset"
        ) from None
    if rank < 0:
        raise ConfigError(f"LOCAL_RANK={rank} is negative; it is torchrun's, leave it unset")
    return rank


def _no_cuda(asked: str) -> ConfigError:
    build = torch.version.cuda
    why = (
        f"this torch build ({torch.__version__}) has no CUDA support"
        if build is None
        else f"torch (CUDA {build}) finds no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"
    )
    return ConfigError(
        f"--device {asked}: {why}; use --device cpu (or auto, which picks the CPU here), or run on a machine "
        "with an NVIDIA GPU and a CUDA build of torch"
    )


def resolve_device(
    spec: str | torch.device | None, local_rank: int | None = None, *, shared: bool = False
) -> torch.device:
    """The device a process computes on, from ``--device`` (or a ``torch.device``).

    Args:
        spec: ``"auto"`` (or None): ``cuda:LOCAL_RANK`` when ``torch.cuda.is_available()``, else the CPU;
            ``"cpu"``; ``"cuda"``: ``cuda:LOCAL_RANK`` (ConfigError without CUDA); ``"cuda:N"`` or a
            ``torch.device``: that device.
        local_rank: this process's place on its machine (None: the ``LOCAL_RANK`` variable, 0 when unset).
        shared: several processes of a machine may share one GPU (``cuda:(LOCAL_RANK mod GPUs)``): for
            strategies whose other ranks do not compute on it (the parameter server's servers). Without it
            a local rank beyond the machine's GPUs is a ConfigError.
    """
    rank = env_local_rank() if local_rank is None else local_rank
    if spec is None:
        spec = "auto"
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            text = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ConfigError(
                f"--device {spec!r} is not a device; choose one of: {', '.join(DEVICE_CHOICES)}"
            ) from None
    elif isinstance(spec, torch.device):
        device = spec
    else:
        raise ConfigError(f"device must be a string or torch.device, got {type(spec).__name__}")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(
            f"device {str(device)!r}: distlearn computes on cpu or cuda; use --device cpu or cuda"
        )
    if not torch.cuda.is_available():
        raise _no_cuda(str(spec))
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else rank
    if shared and device.index is None:
        index = rank % count
    if index >= count:
        raise ConfigError(
            f"--device {spec}: the process of LOCAL_RANK {rank} needs cuda:{index}, but this machine shows "
            f"{count} CUDA device(s); start at most {count} process(es) per machine (--workers, or torchrun "
            "--nproc-per-node), show more GPUs (CUDA_VISIBLE_DEVICES), or use --device cpu"
        )
    return torch.device("cuda", index)


def backend_for(device: torch.device | str | None) -> str:
    """The c10d backend for tensors on ``device``: ``"nccl"`` for CUDA, ``"gloo"`` for the CPU (and None)."""
    if device is None:
        return "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def module_device(model: torch.nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (None for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return None if first is None else first.device


def place_model(
    model: torch.nn.Module, device: torch.device, optimizer: torch.optim.Optimizer | None = None
) -> torch.nn.Module:
    """``model`` on ``device``: moved there (``Module.to``, in place) if no ``optimizer`` was built on it.

    With an ``optimizer`` a model elsewhere is a ConfigError, as torch's DDP asks: the optimizer holds the
    parameters (and may hold state) of where the model was, so the model goes to the device before the
    optimizer is built.
    """
    current = module_device(model)
    if current is None or current == device:
        return model
    if optimizer is not None:
        raise ConfigError(
            f"the model is on {current} but the run computes on {device}; move it before building its "
            f"optimizer (model.to({str(device)!r}), then the optimizer on model.parameters()), or ask for "
            f"device {current.type}"
        )
    return model.to(device)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a tuple/list/dict of them) on ``device``.

    For a CUDA device each host tensor is pinned (page-locked, unless it is already) and copied with
    ``non_blocking=True``: the copy runs on the current stream, ordered before the kernels that use it,
    while the host goes on. Tensors already on ``device``, and everything for the CPU, come back as they
    are (the same objects).
    """
    if isinstance(batch, torch.Tensor):
        if device.type != "cuda":
            return batch if batch.device == device else batch.to(device)
        if batch.device == device:
            return batch
        if batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        return tuple(to_device(item, device) for item in batch)
    if isinstance(batch, list):
        return [to_device(item, device) for item in batch]
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def to_host(state: Any) -> Any:
    """A copy of ``state`` (nested dicts, lists, tuples) with every tensor on the CPU, for a checkpoint that
    loads anywhere; CPU tensors are kept as they are (``torch.save`` copies them)."""
    if isinstance(state, torch.Tensor):
        return state if state.device.type == "cpu" else state.detach().cpu()
    if isinstance(state, dict):
        return {key: to_host(value) for key, value in state.items()}
    if isinstance(state, list):
        return [to_host(item) for item in state]
    if isinstance(state, tuple):
        return tuple(to_host(item) for item in state)
    return state


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator's state of ``device`` (a CPU byte tensor), or None for the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_rng_state(device)


def set_cuda_rng_state(state: torch.Tensor | None, device: torch.device) -> None:
    """Restore :func:`cuda_rng_state` on ``device``; nothing for the CPU or a checkpoint without one."""
    if state is None or device.type != "cuda":
        return
    torch.cuda.set_rng_state(state.cpu(), device)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (before reading a clock); nothing for the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def deterministic_settings(deterministic: bool, device: torch.device) -> None:
    """Switch torch's deterministic algorithms on or off for a run on ``device``.

    On the CPU this is ``torch.use_deterministic_algorithms(deterministic)``: identical runs per seed, and
    an op with no deterministic form raises. On CUDA it also sets ``CUBLAS_WORKSPACE_CONFIG`` (unless set)
    and uses ``warn_only=True``: some ops the models use have no deterministic CUDA kernel (the backward of
    adaptive average pooling in the ResNets; ``NLLLoss`` on CUDA in torch's list), and they warn instead of
    ending the run, so CUDA runs are reproducible only as far as torch's kernels are.
    """
    if not deterministic or device.type != "cuda":
        torch.use_deterministic_algorithms(deterministic)
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
