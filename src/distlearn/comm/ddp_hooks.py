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
    codec: Any, group: Any = None, *, seed: int = 0, timeout_s: float = 300.0
) -> Callable[[Any, Any], torch.futures.Future]:
    """DDP's adapter for a codec: a comm hook that averages each bucket through ``codec`` (a
    :class:`distlearn.comm.compression.Codec`, e.g. from ``create_compressor``).

    Each bucket goes through :func:`distlearn.comm.compression.reduce_bucket` with the context of DDP's
    bucket: its key (DDP's bucket index and length), its gradients' shapes, the group's size, ``seed``
    (the same on every rank) and this rank's random stream seed. The exchange runs synchronously inside the
    hook (no overlap with the rest of backward, unlike DDP's own allreduce) and the returned future is
    already complete. DDP rebuilds its buckets after the first iteration, and the memory (residuals) of the
    first iteration's buckets is then left behind (torch's ``powerSGD_hook`` starts with plain allreduces for
    this reason; use the codec's ``start_iter`` likewise). ``hook.exchange.bytes_sent`` counts this rank's
    bytes; ``hook.codec`` is the codec (its ``state_dict`` goes into a checkpoint).
    """
    from distlearn.comm.compression import BucketContext, Exchange, reduce_bucket, stream_seed

    exchange = Exchange(group, timeout_s=timeout_s)

    def hook(state, bucket):  # type: ignore[no-untyped-def]
        flat = bucket.buffer()
        world_size = dist.get_world_size(group)
        context = BucketContext(
            f"{bucket.index()}:{flat.numel()}",
            tuple(tuple(gradient.shape) for gradient in bucket.gradients()),
            world_size=world_size,
            seed=seed,
            stream_seed=stream_seed(seed, dist.get_rank(group)),
        )
        with torch.no_grad():
            reduce_bucket(codec, flat, context, exchange)
            flat.div_(world_size)
        # CUDA: a CUDA-aware future, completed on the current stream (DDP's later kernels are ordered after)
        future: torch.futures.Future = torch.futures.Future(devices=[flat.device] if flat.is_cuda else None)
        future.set_result(flat)
        return future

    hook.__name__ = f"distlearn_{codec.name}_hook"
    hook.exchange = exchange  # type: ignore[attr-defined]
    hook.codec = codec  # type: ignore[attr-defined]
    hook.compressor = codec  # type: ignore[attr-defined]  # its former name
    return hook
