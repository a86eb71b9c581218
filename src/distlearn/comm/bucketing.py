"""Gradient bucketing and overlap of communication with the backward pass.

Allreducing every parameter's gradient on its own pays the per-message latency ``alpha`` once per tensor;
packing them into a few flat *buckets* pays it once per bucket (Li et al., "PyTorch Distributed", VLDB
2020, section 3.2). And since backward produces gradients from the last layer to the first, a bucket
can be sent while earlier layers are still being differentiated: *overlap*.

:class:`GradientBucketer` does both:

* parameters are taken in **reverse order of registration** (roughly the order backward finishes them)
  and packed greedily into buckets of at most ``bucket_bytes`` (a parameter larger than that gets a
  bucket of its own; ``bucket_bytes=0`` gives one bucket per parameter, i.e. no bucketing);
* with ``overlap=True`` a hook registered with :meth:`torch.Tensor.register_post_accumulate_grad_hook`
  copies each gradient into its bucket as soon as autograd has accumulated it, and when a bucket is
  complete its allreduce is started asynchronously (``reducer.allreduce_async``). Buckets are launched
  strictly in bucket order -- a complete bucket waits for its predecessors -- so every rank issues the
  same collectives in the same order even if its backward finishes parameters in a different order;
* :meth:`GradientBucketer.finish` (called between ``backward()`` and ``optimizer.step()``) launches any
  bucket still pending (parameters that got no gradient this step contribute zeros, on every rank),
  waits for all of them, and writes the averaged gradients ``sum / R`` back into ``param.grad``.

With ``overlap=False`` nothing happens during backward; :meth:`finish` packs and reduces the buckets
one after the other.

Zero copy: with a reducer that has ``shared_buffer(numel, dtype)`` (the shm reducer,
:mod:`distlearn.comm.reducers.shm`) the buckets of a CPU model are allocated in shared memory that every rank
of the host has mapped, so the allreduce reads the peers' gradients where they lie instead of copying them
into a staging segment first.

fp16 loss scaling with a codec: :attr:`GradientBucketer.scaling` (a :class:`distlearn.amp.LossScaleGuard`,
set by the sync strategy) unscales each bucket just before it is sent, and :meth:`finish` lets it agree with
the other ranks on a skipped step before the averaged gradients, multiplied back by the scale, are written.

Gradient accumulation: inside :meth:`GradientBucketer.paused` (what ``model.no_sync()`` of
:func:`distlearn.parallelize` uses) the hooks do nothing, so backward only accumulates into ``param.grad``
and the next backward outside it sends the accumulated gradient. A second backward *outside* it before
:meth:`finish` (accumulation without ``no_sync``) finds its buckets already sent: the bucketer then waits
for them, drops their result, reduces every bucket again from the accumulated ``param.grad`` in
:meth:`finish`, and stops overlapping for the rest of the run (``overlap`` becomes False), so that each
step's gradients are reduced once, at the step. Either way the averaged gradient is that of the sum of the
micro-batches' losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from distlearn.errors import CommError, ConfigError

__all__ = ["Bucket", "GradientBucketer", "plan_buckets"]


@dataclass
class Bucket:
    """One flat buffer holding the gradients of ``params`` back to back."""

    index: int
    params: list[torch.Tensor]
    offsets: list[int]
    buffer: torch.Tensor
    ready: set[int] = field(default_factory=set)  # positions in ``params`` whose gradient is in the buffer
    future: Any = None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def plan_buckets(params: Iterable[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Group ``params`` (already in launch order) greedily into lists of at most ``bucket_bytes`` each.

    A parameter larger than ``bucket_bytes`` gets a bucket of its own; dtypes are never mixed in a bucket.
    """
    if bucket_bytes < 0:
        raise ConfigError(f"bucket size must be >= 0 bytes, got {bucket_bytes}; try --bucket-mb 25")
    plan: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > bucket_bytes or p.dtype != current[0].dtype):
            plan.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        plan.append(current)
    return plan


class GradientBucketer:
    """Averages the gradients of ``params`` across the process group with ``reducer``, by buckets.

    Args:
        params: the model's parameters, in registration order (``model.parameters()``).
        reducer: a :class:`distlearn.comm.reducers.Reducer` (``allreduce_`` / ``allreduce_async`` sum).
        world_size: ``R``; the summed gradients are divided by it.
        bucket_bytes: capacity of a bucket (DDP's default is 25 MB); 0 for one bucket per parameter.
        overlap: start each bucket's allreduce from the gradient hooks during backward. It needs two
            buckets or more: the one bucket of a small model is complete only when backward ends, so
            its hooks would only add work per gradient (measured 2-4% of LeNet's step with R = 2);
            then :attr:`overlap` is False and :meth:`finish` reduces it (``requested_overlap`` keeps
            what was asked for).

    Example::

        bucketer = GradientBucketer(model.parameters(), reducer, world_size=R, bucket_bytes=25 << 20)
        loss.backward()
        bucketer.finish()          # gradients are now averaged over the R replicas
        optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        reducer: Any,
        *,
        world_size: int,
        bucket_bytes: int = 25 << 20,
        overlap: bool = True,
    ) -> None:
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ConfigError("the model has no parameters that require gradients; nothing to synchronise")
        self.reducer = reducer
        self.world_size = world_size
        self.requested_overlap = overlap
        self.buckets: list[Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket index, position)
        for index, group in enumerate(plan_buckets(reversed(trainable), bucket_bytes)):
            offsets, total = [], 0
            for position, p in enumerate(group):
                offsets.append(total)
                total += p.numel()
                self._where[id(p)] = (index, position)
            self.buckets.append(Bucket(index, group, offsets, self._new_buffer(total, group[0])))
        self._next_launch = 0
        self._handles = []
        self._paused = False
        self._resend = False  # a second backward found sent buckets: reduce all again in finish()
        self.scaling: Any = None  # a distlearn.amp.LossScaleGuard when fp16 loss scaling meets a codec
        self.overlap = overlap and len(self.buckets) > 1  # one bucket: nothing to overlap with
        if self.overlap:
            for p in trainable:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))

    def _new_buffer(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A zeroed bucket buffer; from the reducer's ``shared_buffer`` when it has one (the shm reducer:
        peers then read the bucket where it lies, no copy-in) and the bucket is on the CPU of a job."""
        shared = getattr(self.reducer, "shared_buffer", None)
        if shared is not None and like.device.type == "cpu" and dist.is_initialized():
            return shared(numel, like.dtype)
        return torch.zeros(numel, dtype=like.dtype, device=like.device)

    # -- during backward ----------------------------------------------------------------------------------

    def _copy_in(self, bucket: Bucket, position: int) -> None:
        p = bucket.params[position]
        view = bucket.buffer[bucket.offsets[position] : bucket.offsets[position] + p.numel()]
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad.reshape(-1))
        bucket.ready.add(position)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward inside accumulates into ``param.grad`` only; the next backward outside sends the sum."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def _on_gradient(self, param: torch.Tensor) -> None:
        if self._paused or self._resend:
            return
        index, position = self._where[id(param)]
        bucket = self.buckets[index]
        if bucket.future is not None:
            # a second backward before the step (accumulation without no_sync): reduce at the step instead
            self._resend = True
            return
        self._copy_in(bucket, position)
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            if self.scaling is not None:
                self.scaling.unscale(bucket.buffer)
            bucket.future = self.reducer.allreduce_async(bucket.buffer)
            self._next_launch += 1

    # -- before the optimizer step ------------------------------------------------------------------------

    @torch.no_grad()
    def finish(self) -> None:
        """Launch what is left, wait for every bucket, and write ``sum / R`` into each ``param.grad``."""
        try:
            if self._resend:
                self._drop_sent()
            for bucket in self.buckets:
                for position in range(len(bucket.params)):
                    if position not in bucket.ready:
                        self._copy_in(bucket, position)  # unused this step, or overlap off
                if not self.overlap:
                    if self.scaling is not None:
                        self.scaling.unscale(bucket.buffer)
                    self.reducer.allreduce_(bucket.buffer)
            if self.overlap:
                self._launch_ready()
            for bucket in self.buckets:
                if bucket.future is not None:
                    self._wait(bucket)
            scale = None if self.scaling is None else self.scaling.settle([b.buffer for b in self.buckets])
            for bucket in self.buckets:
                bucket.buffer.div_(self.world_size)
                if scale is not None:
                    bucket.buffer.mul_(scale)  # back in the loss scaler's units (distlearn.amp)
                for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                    averaged = bucket.buffer[offset : offset + p.numel()].view_as(p)
                    if p.grad is None:
                        p.grad = averaged.clone()
                    else:
                        p.grad.copy_(averaged)
        finally:
            for bucket in self.buckets:
                bucket.ready.clear()
                bucket.future = None
            self._next_launch = 0
            self._resend = False

    def _drop_sent(self) -> None:
        """Wait for the buckets sent during the first backward and forget them; from now on no overlap."""
        for bucket in self.buckets:
            if bucket.future is not None:
                self._wait(bucket)
            bucket.future = None
            bucket.ready.clear()
        if self.scaling is not None:
            self.scaling.drop()  # their encode changed the codec's state: undone
        self._next_launch = 0
        self.overlap = False
        self.close()  # the hooks: every later step is packed and reduced in finish()

    def _wait(self, bucket: Bucket) -> None:
        try:
            bucket.future.wait()
        except CommError:
            raise
        except Exception as error:  # the backend's own errors (gloo timeouts, closed connections)
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CommError(
                f"rank {rank}: {getattr(self.reducer, 'name', 'the')} allreduce of gradient bucket "
                f"{bucket.index} ({bucket.nbytes:,} bytes) failed: {first_line}; a peer may have died "
                "or be stuck"
            ) from error

    def close(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def describe(self) -> str:
        sizes = [b.nbytes for b in self.buckets]
        overlap = "on" if self.overlap else ("off (one bucket)" if self.requested_overlap else "off")
        return f"{len(sizes)} bucket(s), {sum(sizes) / 2**20:.2f} MB, overlap {overlap}"
