"""Checkpoints of the synchronous RL algorithms (sync-pg, naive), written so that a resumed run is exact.

A checkpoint is one :func:`distlearn.checkpoint.save_checkpoint` file ``OUT/checkpoints/step-<U>.pt``
(``U``: updates done; checksummed, verified when loaded), written by rank 0 every ``--checkpoint-every``
updates. It holds the weights, the optimizer state, the counters, the PPO minibatch generator, the
torch/numpy/python RNG states, and per rank (gathered to rank 0) that rank's action generators and episode
statistics.

The environments: a gymnasium environment's state cannot be saved in general (only tensors and plain values
go into a checkpoint, and an environment is neither), so at every checkpoint boundary every environment is
reset with a seed derived from (``--seed``, its global index, the update) -- in the run that writes the
checkpoint and in the run that resumes from it alike (:func:`boundary_seed`). The episodes under way at the
boundary end there without being counted as finished. With the same config, the uninterrupted run and a run
resumed from any of its checkpoints therefore take exactly the same steps: equal final weights
(tests/rl/test_rl_resume.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distlearn.checkpoint import (
    global_rng_state,
    load_checkpoint,
    restoring,
    save_checkpoint,
    set_global_rng_state,
)
from distlearn.errors import ConfigError
from distlearn.metrics import METRICS_FILE, MetricRecord

__all__ = [
    "FREE",
    "boundary_seed",
    "check_resume",
    "cut_metrics",
    "load_rl_checkpoint",
    "save_rl_checkpoint",
]

FREE = ("out", "resume", "overwrite", "quiet", "log_every", "time_limit", "timeout", "tensorboard")
"""Options a resumed run may change; every other option must equal the checkpoint's."""


def boundary_seed(seed: int, global_index: int, updates: int) -> int:
    """The seed environment ``global_index`` is reset with at the checkpoint boundary after ``updates``."""
    return (seed * 1_000_003 + global_index * 7_919 + updates * 104_729) % 2**31


def _gather(value: Any, rank: int, world_size: int) -> list[Any] | None:
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def save_rl_checkpoint(
    out: Path,
    updates: int,
    shared: dict[str, Any],
    mine: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    config_values: dict[str, Any],
) -> Path | None:
    """Gather every rank's ``mine`` to rank 0, which writes ``shared`` and them; returns the path there."""
    ranks = _gather(mine, rank, world_size)
    if rank != 0:
        return None
    state = {
        **shared,
        "updates": updates,
        "world_size": world_size,
        "ranks": ranks,
        "rng": global_rng_state(),
        "config": {k: v for k, v in config_values.items() if v is not None},
    }
    return save_checkpoint(state, out / "checkpoints", updates)


def check_resume(config_values: dict[str, Any], saved: dict[str, Any], world_size: int) -> None:
    """A checkpoint continues only the run it came from: every option but :data:`FREE` must match."""
    if saved["world_size"] != world_size:
        raise ConfigError(
            f"--resume: the checkpoint was written by {saved['world_size']} processes but this run has "
            f"{world_size}; pass the --workers it was written with, or drop --resume to start afresh"
        )
    then_values = saved["config"]
    for key, now in config_values.items():
        if key in FREE:
            continue
        then = then_values.get(key)
        if now != then:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"--resume: the checkpoint was written with {flag} {then!r} but this run has {now!r}; "
                f"pass {flag} {then!r} to continue it, or drop --resume to start afresh"
            )


def load_rl_checkpoint(
    path: str | Path, config_values: dict[str, Any], *, rank: int, world_size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, this rank's part)`` of a checkpoint file (or a directory's newest), checked against the run.

    The global RNG states are restored here.
    """
    state = load_checkpoint(path)  # its checksum verified
    if state.get("algorithm") != config_values.get("algorithm"):
        raise ConfigError(
            f"--resume {path}: a checkpoint of {state.get('algorithm')!r}, not of "
            f"{config_values.get('algorithm')!r}; pass a checkpoint of this algorithm"
        )
    with restoring(state):  # a missing entry: CheckpointError naming the file and the last good one
        check_resume(config_values, state, world_size)
        set_global_rng_state(state["rng"])
        return state, state["ranks"][rank]


def cut_metrics(out: Path, updates: int) -> None:
    """Cut ``OUT/metrics.jsonl`` back to the records of updates <= ``updates`` (no summary): resumed runs
    append after them, so the file holds one record per update however often the run was resumed."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    import json

    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = MetricRecord.from_dict(json.loads(line))
        except Exception:  # a line cut short by the kill
            continue
        if record.kind != "summary" and record.step <= updates:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
