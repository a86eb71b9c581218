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

and :func:`compression_ddp_comm_hook` sends DDP's buckets through a gradient codec of
:mod:`distlearn.comm.compression` (its residuals kept per DDP bucket)::

    hook = compression_ddp_comm_hook(create_compressor("powersgd", rank=2))
    ddp.register_comm_hook(state=None, hook=hook)
    ...; hook.exchange.bytes_sent        # bytes this rank has sent
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["as_ddp_comm_hook", "compression_ddp_comm_hook"]


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


def compression_ddp_comm_hook(
    compressor: Any, group: Any = None, *, seed: int = 0, timeout_s: float = 300.0
) -> Callable[[Any, Any], torch.futures.Future]:
    """A DDP comm hook that averages each bucket through ``compressor`` (a :class:`Compressor`).

    The exchange runs synchronously inside the hook (no overlap with the rest of backward, unlike DDP's
    own allreduce) and the returned future is already complete. State is keyed by DDP's bucket index and
    length: DDP rebuilds its buckets after the first iteration, and the residuals of the first iteration's
    buckets are then left behind (torch's ``powerSGD_hook`` starts with plain allreduces for this reason;
    use the codec's ``start_iter`` likewise). ``hook.exchange.bytes_sent`` counts this rank's bytes.
    """
    from distlearn.comm.compression import Exchange

    exchange = Exchange(group, timeout_s=timeout_s)
    bound: list[bool] = []

    def hook(state, bucket):  # type: ignore[no-untyped-def]
        if not bound:
            compressor.bind(rank=dist.get_rank(group), world_size=dist.get_world_size(group), seed=seed)
            bound.append(True)
        flat = bucket.buffer()
        shapes = [tuple(gradient.shape) for gradient in bucket.gradients()]
        with torch.no_grad():
            compressor.reduce(f"{bucket.index()}:{flat.numel()}", flat, shapes, exchange)
            flat.div_(dist.get_world_size(group))
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(flat)
        return future

    hook.__name__ = f"distlearn_{compressor.name}_hook"
    hook.exchange = exchange  # type: ignore[attr-defined]
    hook.compressor = compressor  # type: ignore[attr-defined]
    return hook
