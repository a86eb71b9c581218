"""Every rank of a job runs with the same options: compared once, when the strategy joins the job.

A job's ranks each parse their own command line or config file: ``distlearn train --workers N`` hands all of
them one file, but ranks started by hand (``torchrun`` on each node, a config file per machine) can differ.
A rank with another ``--bucket-mb`` or ``--reducer`` sends collectives of other sizes, which gloo answers
with an abort, not a message. So, after joining the group and before the first collective on gradients,
each rank all-gathers a fingerprint (SHA-256) of the run's common options and its strategy options; when
they differ, the values of the differing fields are gathered and every rank raises the same ConfigError
naming them and each rank's value.

Fields that may differ per rank (:data:`PER_RANK_FIELDS`) are left out: where this process writes and
reads (``out``, ``data_root``, ``resume``: paths can be per machine), how it shows progress (``progress``,
``progress_every``, ``quiet``, ``tensorboard``, ``name``), its threads, ``workers`` (processes on this
machine; the group's size is what counts), ``comm_timeout`` (each rank's own waits) and
``ps_shared_memory`` (each worker and server agree on it per link, at the first pull). Everything else --
the data, model, optimizer, batch, schedule, seed and every strategy option -- must agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

from distlearn.comm.groups import wait_within
from distlearn.config import flag
from distlearn.errors import ConfigError

__all__ = ["PER_RANK_FIELDS", "agreed_values", "check_same_options"]

PER_RANK_FIELDS = frozenset(
    {
        "out", "data_root", "resume", "name", "progress", "progress_every", "quiet", "tensorboard",
        "threads", "workers", "comm_timeout", "ps_shared_memory",
    }
)  # fmt: skip
"""Options a rank may set on its own (see the module docstring); every other one is compared."""


def agreed_values(run: Any, options: Any) -> dict[str, str]:
    """The compared options as ``{field: repr(value)}``: the run's common ones (a dataclass, e.g. a
    TrainConfig; None in a user's loop) and the strategy's, less :data:`PER_RANK_FIELDS`."""
    values: dict[str, str] = {}
    for source in (run, options):
        if source is None or not dataclasses.is_dataclass(source):
            continue
        for field in dataclasses.fields(source):
            if field.name != "options" and field.name not in PER_RANK_FIELDS:
                values[field.name] = repr(getattr(source, field.name))
    return values


def _fingerprint(values: dict[str, str]) -> torch.Tensor:
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).digest()
    return torch.tensor([int.from_bytes(digest[:8], "big", signed=True)], dtype=torch.int64)


def check_same_options(run: Any, options: Any, *, rank: int, world_size: int, timeout_s: float) -> None:
    """ConfigError on every rank when the ranks' options differ, naming each differing field and the
    ranks' values; a CommError when a peer does not answer within ``timeout_s``."""
    if world_size < 2:
        return
    values = agreed_values(run, options)
    mine = _fingerprint(values)
    everyone = [torch.zeros_like(mine) for _ in range(world_size)]
    work = dist.all_gather(everyone, mine, async_op=True)
    wait_within(work, timeout_s, rank=rank, what="comparing the ranks' options")
    if all(torch.equal(other, mine) for other in everyone):
        return
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, values)  # bounded by the group's timeout (--comm-timeout)
    names = sorted({name for ranks_values in gathered for name in ranks_values})
    differing = [name for name in names if len({v.get(name) for v in gathered}) > 1]
    shown = "; ".join(
        f"{flag(name)}: " + ", ".join(f"rank {r} {v.get(name, '(none)')}" for r, v in enumerate(gathered))
        for name in differing
    )
    raise ConfigError(
        f"the ranks of this job were started with different options ({shown}); start every rank with the "
        "same flags and config file"
    )
