"""Checkpoints: written atomically, checksummed, the previous good one kept, read with ``weights_only=True``.

A checkpoint is one ``torch.save`` file ``<dir>/step-<NNNNNNNN>.pt`` holding tensors and plain Python values
only (model, optimizer and scheduler state, data position, RNG states, the config), so it loads with
``torch.load(..., weights_only=True)``: opening a checkpoint never runs code from it.

The format (:data:`ENVELOPE`): the file is a dict ``{"format": "distlearn-checkpoint-2", "sha256": HEX,
"payload": uint8 tensor}``; the payload tensor holds the ``torch.save`` bytes of the state dict (whose own
``format`` key is :data:`FORMAT`) and ``sha256`` is their SHA-256. Loading checks the digest before it
unpickles the payload, so a flipped bit anywhere in the state is a :class:`CheckpointError`, not a weight
that silently became -4e24. Files of the older format (the state dict at the top level, no checksum) still
load, with a warning that they cannot be verified.

Writing: the file goes to a temporary file in the same directory, is flushed and fsynced, then renamed over
the final name with ``os.replace`` (atomic on POSIX), so a reader sees the old file or the new one, never
half of one. Only after the new file is in place are files older than the newest ``keep`` deleted, so a
crash or a full disk at any moment leaves the previous good checkpoint; a failed write removes its
temporary file and raises a CheckpointError (saying when the disk is full, and naming the directory).

Reading: a missing, truncated or corrupt file, one that fails its checksum, or one that is no checkpoint
raises CheckpointError naming the file and the last good checkpoint of the same directory (the newest that
reads back and verifies) with the ``--resume`` to continue from it; :func:`check_fits` and
:func:`restoring` turn a state that does not fit the run (a missing entry, a tensor of another shape) into
the same kind of error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distlearn.errors import CheckpointError, DistlearnError

__all__ = [
    "global_rng_state",
    "set_global_rng_state",
    "ENVELOPE",
    "FORMAT",
    "check_fits",
    "checkpoint_path",
    "last_good_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_verified",
    "restart_advice",
    "restoring",
    "resume_hint",
    "save_checkpoint",
    "write_verified",
]

FORMAT = "distlearn-checkpoint-1"
"""Value of the ``format`` key of every checkpoint's state dict."""

ENVELOPE = "distlearn-checkpoint-2"
"""Value of the ``format`` key of the checksummed envelope a checkpoint file holds (since checksums)."""

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


def _serialize(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def _os_error(error: BaseException | None) -> OSError | None:
    """``error`` if it is an OSError, else the first OSError it was raised from or while handling."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def write_verified(payload: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``payload`` (tensors and plain values) to ``path`` inside a checksummed envelope.

    The file is ``{"format": ENVELOPE, "sha256": hex digest, "payload": uint8 tensor}``, the tensor holding
    the ``torch.save`` bytes of ``payload``; :func:`read_verified` checks the digest before it unpickles
    them. A failed write (a full disk included) removes its temporary file, leaves any earlier file at
    ``path`` as it was, and raises :class:`CheckpointError` naming the directory.
    """
    path = Path(path)
    directory = path.parent
    temporary = directory / f".{path.name}.tmp-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        data = _serialize(payload)
        envelope = {
            "format": ENVELOPE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
        }
        with open(temporary, "wb") as handle:
            torch.save(envelope, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        cause = _os_error(error)  # torch.save may raise a RuntimeError while handling the file's OSError
        if cause is None:
            raise
        error = cause
        if error.errno == errno.EFBIG:
            raise CheckpointError(
                f"could not write checkpoint {path}: the file exceeds the size limit for {directory} "
                f"({error.strerror}); raise the limit (ulimit -f) or give the run another --out"
            ) from error
        if _disk_full(error):
            raise CheckpointError(
                f"could not write checkpoint {path}: the disk holding {directory} is full "
                f"({error.strerror}); free space there, or give the run another --out"
            ) from error
        raise CheckpointError(
            f"could not write checkpoint {path}: {error}; check that {directory} is writable, or give the "
            "run another --out"
        ) from error
    try:  # make the rename itself durable
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass
    return path


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, *, keep: int = 2) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step`` and keep the newest ``keep`` files.

    Returns the path written. ``keep`` must be at least 2 so a good previous checkpoint always survives.
    A failed write raises :class:`CheckpointError` (saying so when the disk is full) and leaves no temporary
    file; the earlier checkpoints stay.
    """
    if keep < 2:
        raise ValueError(f"keep must be >= 2 so the previous checkpoint survives, got {keep}")
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    try:
        write_verified({"format": FORMAT, **state}, path)
    except CheckpointError as error:
        last = last_good_checkpoint(directory, besides=path)
        kept = f"the last good checkpoint {last} is untouched" if last else "no earlier checkpoint exists"
        raise CheckpointError(f"{error} ({kept})") from error.__cause__
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _load(source: Path | io.BytesIO, path: Path, map_location: str | torch.device = "cpu") -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # a pickled class, not a damaged file
            found = re.search(r"GLOBAL (\S+)", str(error))
            raise CheckpointError(
                f"checkpoint {path} holds a Python object that weights_only loading refuses "
                f"({found.group(1) if found else _one_line(error)}); "
                f"save only tensors and plain values in optimizer/strategy state"
            ) from error
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))  # torch's long text: its cause
        reason = found.group(1).strip() if found else _one_line(error)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, UnicodeDecodeError,
            AttributeError, IndexError, KeyError, TypeError, MemoryError) as error:  # fmt: skip
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_one_line(error)})") from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__  # (an empty file: a bare EOFError)
    return text if len(text) <= 300 else text[:297] + "..."


def read_verified(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload :func:`write_verified` wrote to ``path``, its SHA-256 checked first, its tensors loaded
    onto ``map_location``.

    A file without the envelope whose top level is a dict with ``format`` :data:`FORMAT` (a checkpoint of
    distlearn before checksums) is returned as it is, with a warning that it cannot be verified. Anything
    else raises :class:`CheckpointError` naming the file and what is wrong with it.
    """
    path = Path(path)
    outer = _load(path, path)
    if isinstance(outer, dict) and outer.get("format") == ENVELOPE:
        payload, digest = outer.get("payload"), outer.get("sha256")
        if not (
            isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and isinstance(digest, str)
        ):
            raise CheckpointError(f"checkpoint {path} is corrupt (its envelope lacks payload or sha256)")
        data = payload.numpy().tobytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CheckpointError(
                f"checkpoint {path} fails its checksum (SHA-256 {actual[:16]}... where it was written with "
                f"{digest[:16]}...): the file changed after it was saved (a flipped bit, a bad disk or "
                "copy)"
            )
        return _load(io.BytesIO(data), path, map_location)
    if isinstance(outer, dict) and outer.get("format") == FORMAT:
        warnings.warn(
            f"checkpoint {path} was written by a distlearn without checksums: it is loaded unverified",
            UserWarning,
            stacklevel=3,
        )
        return outer
    raise CheckpointError(f"{path} is not a distlearn checkpoint (no format={FORMAT!r})")


def last_good_checkpoint(directory: str | Path, *, besides: str | Path | None = None) -> Path | None:
    """The newest checkpoint in ``directory`` that reads back and passes its checksum (``besides`` skipped).

    Reads each candidate whole, newest first: meant for error messages, not for every step.
    """
    skip = Path(besides).resolve() if besides is not None else None
    for candidate in reversed(list_checkpoints(directory)):
        if skip is not None and candidate.resolve() == skip:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_verified(candidate)
        except CheckpointError:
            continue
        return candidate
    return None


def resume_hint(path: str | Path) -> str:
    """What to resume from instead of the checkpoint ``path``: the last good one beside it, or nothing."""
    path = Path(path)
    good = last_good_checkpoint(path.parent, besides=path)
    if good is None:
        return f"there is no other good checkpoint in {path.parent}: start afresh (drop --resume)"
    return f"the last good checkpoint is {good}: resume from it with --resume {good}"


def restart_advice(directory: str | Path | None) -> str:
    """After a failed run: the last good checkpoint of ``directory`` (None: checkpoints were off) and the
    ``--resume`` that continues from it, or how to start afresh."""
    if directory is None:
        return "No checkpoint was written (--no-checkpoints): start afresh with --overwrite and a lower --lr"
    good = last_good_checkpoint(directory)
    if good is None:
        return (
            f"No checkpoint was written before the divergence (in {directory}): start afresh with "
            "--overwrite and a lower --lr"
        )
    return (
        f"The last good checkpoint is kept: {good}; continue from it with --resume {good} and a lower --lr, "
        "or start afresh with --overwrite"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the newest one of a directory, with ``weights_only=True``.

    Its tensors are loaded onto ``map_location`` (the CPU by default; a run resumes onto its device).
    The checksum is verified first. Raises :class:`CheckpointError` when the file is missing, truncated,
    corrupt, fails its checksum, is not a distlearn checkpoint, or holds objects ``weights_only`` refuses;
    the message names the last good checkpoint of the same directory and how to resume from it.
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
    try:
        state = read_verified(path, map_location)
    except CheckpointError as error:  # only now look for the good one (it means reading the others)
        raise CheckpointError(f"{error}; {resume_hint(path)}") from error.__cause__
    state["path"] = str(path)
    return state


def check_fits(module: torch.nn.Module, saved: Any, path: str | Path) -> None:
    """CheckpointError unless ``saved`` (a state dict) has exactly ``module``'s entries, shape for shape."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path}: the model entry is not a state dict; {resume_hint(path)}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    wrong = [
        f"{k} is {tuple(saved[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape
    ]
    problems = []
    if wrong:
        problems.append("; ".join(wrong[:3]) + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    if missing:
        problems.append(f"it lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(
            f"it has entries the model lacks: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
        )
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {'; '.join(problems)}; resume with the --model (and "
            f"data) it was written with, or {resume_hint(path)}"
        )


@contextlib.contextmanager
def restoring(saved: dict[str, Any]) -> Iterator[None]:
    """Inside the block, a missing entry or a value that does not fit (``saved[...]`` raising KeyError,
    a ``load_state_dict`` raising) becomes a :class:`CheckpointError` naming the file; distlearn's own
    errors pass through."""
    path = saved.get("path", "the checkpoint")
    try:
        yield
    except DistlearnError:
        raise
    except KeyError as error:
        raise CheckpointError(
            f"checkpoint {path} has no entry {error} (it holds {', '.join(sorted(map(str, saved)))}): it was "
            f"not written by this kind of run, or is damaged; {resume_hint(path)}"
        ) from error
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run ({_one_line(error)}); {resume_hint(path)}"
        ) from error


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
