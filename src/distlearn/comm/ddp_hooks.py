"""Our reducers (and codecs) as DistributedDataParallel communication hooks.

DDP calls a comm hook ``hook(state, bucket) -> Future[Tensor]`` once per gradient bucket during backward
(``torch.distributed.algorithms.ddp_comm_hooks``); the future must resolve to the bucket's *averaged*
gradient. :func:`as_ddp_comm_hook` turns any :class:`distlearn.comm.reducers.Reducer` into one, so DDP's
own bucketing and overlap run with our ring, tree, Rabenseifner or segmented-ring allreduce::

    from torch.nn.parallel import DistributedDataParallel as DDP
    from distlearn.comm.ddp_hooks import as_ddp_comm_hook
    from distlearn.comm.reducers import create_reducer

    ddp = DDP(model)
    ddp.register_comm_hook(state=None, hook=as_ddp_comm_hook(create_reducer("ring")))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["as_ddp_comm_hook"]


def as_ddp_comm_hook(reducer: Any, group: Any = None) -> Callable[[Any, Any], torch.futures.Future]:
    """A DDP comm hook that sums each bucket with ``reducer`` and divides by the group's size."""

    # No annotations on purpose: DDP compares them with dist.GradBucket and torch.futures.Future, and under
    # ``from __future__ import annotations`` they would be strings.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        world_size = dist.get_world_size(group)
        future = reducer.allreduce_async(bucket.buffer(), group)
        return future.then(lambda done: done.value().div_(world_size))

    hook.__name__ = f"distlearn_{getattr(reducer, 'name', 'reducer')}_hook"
    return hook
