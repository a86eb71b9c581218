"""Checkpoints: written atomically, the previous good one kept, read back with ``weights_only=True``.

A checkpoint is one ``torch.save`` file ``<dir>/step-<NNNNNNNN>.pt`` holding a dict of tensors and plain
Python values only (model, optimizer and scheduler state, data position, RNG states, the config), so it
loads with ``torch.load(..., weights_only=True)``: opening a checkpoint never runs code from it.

Writing: the state goes to a temporary file in the same directory, is flushed and fsynced, then renamed
over the final name with ``os.replace`` (atomic on POSIX), so a reader sees the old file or the new
one, never half of one. Only after the new file is in place are files older than the newest ``keep``
deleted, so a crash or a full disk at any moment leaves the previous good checkpoint.

Reading: a truncated or corrupt file raises :class:`distlearn.errors.CheckpointError` naming the file and
the previous checkpoint to resume from instead.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distlearn.errors import CheckpointError

__all__ = [
    "global_rng_state",
    "set_global_rng_state",
    "FORMAT",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "distlearn-checkpoint-1"
"""Value of the ``format`` key every checkpoint carries."""

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest step first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _previous(path: Path) -> Path | None:
    older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    return older[-1] if older else None


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, *, keep: int = 2) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step`` and keep the newest ``keep`` files.

    Returns the path written. ``keep`` must be at least 2 so a good previous checkpoint always survives.
    """
    if keep < 2:
        raise ValueError(f"keep must be >= 2 so the previous checkpoint survives, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    temporary = directory / f".{path.name}.tmp-{os.getpid()}"
    payload = {"format": FORMAT, **state}
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write checkpoint {path}: {error}; free disk space or choose another --out "
            f"(the previous checkpoint {_previous(path)} is untouched)"
        ) from error
    try:  # make the rename itself durable
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file, or the newest one of a directory, with ``weights_only=True``.

    Raises :class:`CheckpointError` when the file is missing, truncated, corrupt, not a distlearn
    checkpoint, or holds objects ``weights_only`` refuses; the message names the previous checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"no checkpoint (step-*.pt) in directory {path}; pass a checkpoint file")
        path = newest
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a checkpoint file, or a run's OUT/checkpoints directory"
        )
    previous = _previous(path)
    fallback = (
        f"the previous checkpoint is {previous}: resume from it with --resume {previous}"
        if previous
        else "there is no earlier checkpoint in that directory"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that weights_only loading refuses ({error}); "
                f"save only tensors and plain values in optimizer/strategy state; {fallback}"
            ) from error
        raise CheckpointError(f"checkpoint {path} is corrupt ({error}); {fallback}") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error}); {fallback}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distlearn checkpoint (no format={FORMAT!r}); {fallback}")
    state["path"] = str(path)
    return state


def global_rng_state() -> dict[str, Any]:
    """The global torch, NumPy and Python RNG states as tensors and plain values (a ``weights_only`` load
    reads them back); :func:`set_global_rng_state` restores them."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"])
    )
