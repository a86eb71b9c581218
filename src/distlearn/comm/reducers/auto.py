"""``--reducer auto``: the shared-memory reducer when every rank of the job is on one host, else the backend.

:func:`resolve_reducer` turns ``"auto"`` into a concrete name of :data:`distlearn.comm.reducers.REDUCERS` from
what each rank can see without communicating, so that every rank of the job decides the same:

* ``shm`` when the device is the CPU and torchrun's ``LOCAL_WORLD_SIZE`` equals ``WORLD_SIZE`` (this node
  runs every rank of the job; on several nodes each node's count is smaller, on every rank);
* ``backend`` otherwise (a CUDA device: NCCL's own allreduce; several hosts: gloo's), and when torchrun's
  variables are missing (a process group made by hand: nothing says where the ranks run).

Any other name is returned as it is.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["AUTO", "one_host", "resolve_reducer"]

AUTO = "auto"


def one_host() -> bool:
    """Whether torchrun says that this node runs every rank of the job: ``LOCAL_WORLD_SIZE == WORLD_SIZE``."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    return local is not None and world is not None and local.strip() == world.strip()


def resolve_reducer(name: str, device: Any = "cpu") -> str:
    """``name``, or for ``"auto"`` ``"shm"`` on the CPU of a one-host job and ``"backend"`` otherwise."""
    if name != AUTO:
        return name
    kind = getattr(device, "type", str(device).split(":")[0])
    return "shm" if kind == "cpu" and one_host() else "backend"
