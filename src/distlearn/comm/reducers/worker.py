"""The reducers' asynchronous worker thread, and on CUDA the stream it runs on.

:meth:`distlearn.comm.reducers.Reducer.allreduce_async` queues each call for one worker thread per reducer
(:func:`run_jobs`), which runs the calls in issue order and completes each call's future.

On a CUDA tensor the caller's kernels that produce it run asynchronously on the caller's current stream, and a
thread's current device and stream are its own (a new thread starts on device 0's default stream). So
:func:`worker_context`, in the caller's thread, records an event on the caller's current stream and returns
a context in which the worker runs the call: the tensor's device, the reducer's own stream for that device,
which first waits for that event (so nothing reads the tensor before it is produced, and the host does not
wait). The tensor is marked as used on that stream (``record_stream``) so the caching allocator does not
hand its memory out again early. The future is CUDA-aware (``torch.futures.Future(devices=...)``) and its
result is set inside the context: ``future.wait()`` then makes the caller's current stream wait for the
reducer's stream, again without a host synchronisation. On the CPU the context does nothing.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["run_jobs", "worker_context"]

Context = Callable[[], contextlib.AbstractContextManager[Any]]


def worker_context(tensor: torch.Tensor, streams: dict[torch.device, Any]) -> Context:
    """How the worker runs a call on ``tensor`` (see the module docstring); ``streams`` is the reducer's
    stream per device, created here on first use. Call it in the caller's thread, when the call is made."""
    if not tensor.is_cuda:
        return contextlib.nullcontext
    device = tensor.device
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    tensor.record_stream(stream)

    @contextlib.contextmanager
    def on_device() -> Iterator[None]:
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            yield

    return on_device


def run_jobs(jobs: queue.SimpleQueue) -> None:
    """The worker thread: run ``(run, future, done, context)`` jobs in order until a None."""
    while True:
        job = jobs.get()
        if job is None:
            return
        run, future, done, on_device = job
        try:
            with on_device():  # CUDA: the caller's device, the reducer's stream (set_result records on it)
                try:
                    result = run()
                finally:
                    done()
                future.set_result(result)
        except BaseException as error:  # noqa: BLE001 -- handed to the caller through the future
            future.set_exception(error)
