"""The run directory ``--out``: an earlier run there is refused, continued (``--resume``) or replaced.

A run writes into ``OUT``: ``metrics.jsonl`` (and ``metrics.rank<k>.jsonl`` of other ranks),
``checkpoints/step-*.pt``, ``tensorboard/rank<k>/`` events, a parameter server's ``ps-server<k>.json``
and ``ps-server<k>-final.pt`` and, for DNI, ``summary.json`` and ``messages.rank<k>.json``. A new run
into a directory that holds such files would mix its records and checkpoints with the earlier run's (and
``--resume OUT/checkpoints`` would then pick the earlier run's newest checkpoint), so
:func:`prepare_out` refuses it unless ``--resume`` continues that run or ``--overwrite`` removes those
files first -- only those: anything else in ``OUT`` stays. An ``OUT`` that cannot be created or written
is refused first (:func:`check_writable`). ``distlearn train`` and ``distlearn rl`` share it.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path
from typing import Any

from distlearn.errors import ConfigError

__all__ = ["check_writable", "earlier_run", "prepare_out"]

_FILES = (
    re.compile(r"metrics(\.rank\d+)?\.jsonl(\.tmp)?"),
    re.compile(r"summary\.json"),
    re.compile(r"messages\.rank\d+\.json"),
    re.compile(r"ps-server\d+(\.json|-final\.pt)"),
)
_CHECKPOINT = re.compile(r"(step-\d+\.pt|\.step-\d+\.pt\.tmp-\d+)")
_EVENTS = re.compile(r"events\.out\.tfevents\..*")


def earlier_run(out: str | Path) -> list[Path]:
    """The files of an earlier run in ``out`` (those a distlearn run writes), sorted; [] if none."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [path for path in out.iterdir() if path.is_file() and any(p.fullmatch(path.name) for p in _FILES)]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():
        found += [path for path in checkpoints.iterdir() if _CHECKPOINT.fullmatch(path.name)]
    tensorboard = out / "tensorboard"
    if tensorboard.is_dir():
        found += [path for path in tensorboard.glob("rank*/*") if _EVENTS.fullmatch(path.name)]
    return sorted(found)


def check_writable(out: str | Path) -> None:
    """ConfigError unless ``--out`` is a directory this process can create and write files in, naming the
    path and why not. The directory is created (the run writes there next); a probe file is removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        why = error.strerror or str(error)
        if existing != out.absolute():
            why = f"cannot create a directory in {existing}: {why}"
        else:
            why = f"cannot write a file in it: {why}"
        raise ConfigError(
            f"--out {out} is not writable ({why}); choose a directory you can write, e.g. --out runs/train"
        ) from None


def prepare_out(config: Any, out: str | Path | None = None) -> None:
    """Refuse an ``--out`` holding an earlier run unless ``--resume`` or ``--overwrite`` (which removes it).

    ``config`` has ``out``, ``resume`` and ``overwrite`` (``out`` overrides ``config.out``, for a command
    with a default directory). Runs before any worker starts (the launcher) and again in each worker before
    its rendezvous, where no process has written anything yet.
    """
    out = Path(out if out is not None else config.out)
    check_writable(out)
    if config.resume is not None and config.overwrite:
        raise ConfigError(
            "--resume continues the run in --out and --overwrite deletes it: pass only one of them"
        )
    if config.resume is not None:
        return
    found = earlier_run(out)
    if not found:
        return
    if not config.overwrite:
        shown = ", ".join(str(path.relative_to(out)) for path in found[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        raise ConfigError(
            f"--out {out} holds an earlier run ({shown}{more}); pass --resume {out / 'checkpoints'} "
            "to continue it, --overwrite to delete its metrics, checkpoints and TensorBoard events first, "
            "or another --out"
        )
    for path in found:
        path.unlink(missing_ok=True)  # another worker of this job may have removed it already
    for directory in [*sorted((out / "tensorboard").glob("rank*")), out / "tensorboard", out / "checkpoints"]:
        with contextlib.suppress(OSError):  # kept when it holds files distlearn did not write
            directory.rmdir()
