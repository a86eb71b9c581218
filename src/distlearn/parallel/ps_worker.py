"""The worker side of ``--strategy ps``: pull the shards, push gradients, heartbeats, checkpoint requests.

See :mod:`distlearn.parallel.ps` for the algorithm and :mod:`distlearn.comm.paramserver` for the protocol;
this module keeps one :class:`~distlearn.comm.paramserver.ServerLink` per server and the worker's own state
(the accumulated gradient of ``k`` local steps, the push count, the staleness the servers reported).

On a CUDA worker the parameters and gradients live on the GPU and every payload is staged in host memory
(the servers and the gloo transport work on CPU tensors): each link's reply buffer and push buffer are
pinned, the pushed gradient is copied device -> host before the send, and the reply's weights host ->
device (non-blocking copies, one synchronisation per reply before its buffer is reused).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn

from distlearn.comm.p2p import HEADER_SIZE, REPLY, REQUEST, Header, Kind, Transport
from distlearn.comm.paramserver import (
    Heartbeat,
    PushFlag,
    ReplyFlag,
    ServerLink,
    SharedPair,
    shard_parameters,
)
from distlearn.errors import CommError, ConfigError
from distlearn.parallel.ps_codecs import encode_push

__all__ = ["DownpourWorker", "PushGate"]


class PushGate(Protocol):
    """Hooks around each push of a worker (deterministic schedules in tests and experiments)."""

    def before_push(self, worker: int, push: int) -> None: ...

    def after_pull(self, worker: int, push: int) -> None: ...


def _can_live_in(parameter: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether a worker's parameter may be rebound to a view of its shared reply block (same dtype, CPU,
    not itself shared: a Hogwild!-style shared parameter must stay where its other users see it)."""
    return parameter.dtype == view.dtype and parameter.device == view.device and not parameter.is_shared()


class DownpourWorker:
    """One worker of the ps strategy, talking to ranks ``0 .. servers-1``.

    Args:
        transport: this worker's transport.
        servers: number of server ranks.
        params: the model's trainable parameters (sharded over the servers by
            :func:`~distlearn.comm.paramserver.shard_parameters`).
        replica_index: this worker's index among the workers (for the gate).
        local_steps, clip_grad_norm, worker_timeout_s, shared_memory, gate, compressor: the strategy's
            settings of the same names.
        staleness_seen: the list the per-push staleness is appended to (the strategy's).
        versions: the list kept equal to :attr:`versions` (the strategy's ``_versions``).
        device: where ``params`` live (CUDA: payloads staged through pinned host buffers).
        heartbeat: the worker's :class:`~distlearn.comm.paramserver.Heartbeat` when it beats already (the
            strategy starts it when the worker joins the job); None: one is started after the first pull.
    """

    def __init__(
        self,
        transport: Transport,
        servers: int,
        params: list[torch.Tensor],
        *,
        replica_index: int,
        local_steps: int,
        clip_grad_norm: float | None,
        worker_timeout_s: float,
        shared_memory: bool,
        gate: PushGate | None,
        compressor: Any,
        staleness_seen: list[list[int]],
        versions: list[int] | None = None,
        device: torch.device | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.pinned = self.device.type == "cuda"  # host staging buffers page-locked for the GPU's copies
        self.transport = transport
        self.rank = transport.rank
        self.servers = servers
        self.params = params
        self.plan = shard_parameters([p.numel() for p in params], servers)
        self.links = [
            ServerLink(transport, s, sum(params[i].numel() for i in self.plan[s]), pin=self.pinned)
            for s in range(servers)
        ]
        self.replica_index = replica_index
        self.local_steps = local_steps
        self.clip_grad_norm = clip_grad_norm
        self.worker_timeout_s = worker_timeout_s
        self.shared_memory = shared_memory
        self.gate = gate
        self.compressor = compressor
        self.staleness_seen = staleness_seen
        self._versions_out = versions if versions is not None else []
        self._versions_out[:] = [0] * servers
        self.accumulated: list[torch.Tensor] | None = None
        self.local = 0
        self.pushes = 0
        self.steps_done = 0
        self.staleness_window: list[float] = []
        self._push_buffers: list[torch.Tensor] = []
        self.heartbeat = heartbeat or Heartbeat(transport, list(range(servers)), worker_timeout_s / 4)
        self.closed = False

    @property
    def versions(self) -> list[int]:
        """The version of each server's shard in its last reply."""
        return [link.version for link in self.links]

    def start(self) -> None:
        """The first pull, then the heartbeat thread."""
        self.pull(initial=True)
        self.heartbeat.start()

    # -- pulls ----------------------------------------------------------------------------------------------

    def _shard_values(self, server: int) -> torch.Tensor:
        indices = self.plan[server]
        sizes = torch.tensor([float(self.params[i].numel()) for i in indices], dtype=torch.float64)
        if not indices:
            return sizes
        values = torch.cat([self.params[i].detach().reshape(-1).double() for i in indices])
        return torch.cat([sizes, values.cpu()])  # (a CUDA worker's initial values come to the host)

    def pull(self, initial: bool) -> None:
        """Send INIT (our layout and initial values) to every server and load the weights they answer.

        At the first pull each INIT also offers two shared-memory blocks (their token in ``step``); a
        server on this machine maps them and says so in its answer, and from then on the payloads of this
        pair go through them (see :mod:`distlearn.comm.paramserver.shared`).
        """
        offers = {
            s: SharedPair.offer(link.flat.numel()) if self.shared_memory else None
            for s, link in enumerate(self.links)
            if link.shared is None
        }
        try:
            what = "the initial pull" if initial else "the pull after resuming"
            replies = [link.post(what) for link in self.links]
            pending = []
            for server, link in enumerate(self.links):
                payload = self._shard_values(server)
                offer = link.shared or offers.get(server)
                header = Header(
                    Kind.INIT, step=offer.token if offer else 0, length=payload.numel(),
                    flag=len(self.plan[server]), sender=self.rank,
                )  # fmt: skip
                pending += link.send(header, payload)
            self.transport.finish(pending)
            for server, reply in enumerate(replies):
                header = self._receive(server, reply)
                offer = offers.get(server)
                if offer is not None and header.flag & ReplyFlag.SHARED_ACCEPTED:
                    self.links[server].accept(offer)
                    self._push_buffers = []  # rebuilt on the next push, the shared ones in place
        finally:  # a server that mapped the blocks unlinked them; the rest go here, even after an error
            for offer in offers.values():
                if offer is not None:
                    offer.unlink()

    def _refused(self, server: int) -> Any:
        def error(header: Header) -> Exception:
            return ConfigError(
                f"server rank {server} refused worker rank {self.rank}: this worker's model does not match "
                "the parameters the server holds (different architecture, or a checkpoint of another model); "
                "every process must build the same --model"
            )

        return error

    def _receive(self, server: int, reply: Any) -> Header:
        """Wait for ``server``'s PARAMS and load them into the parameters of its shard."""
        link = self.links[server]
        header = link.receive(reply, self._refused(server))
        self._versions_out[server] = header.version
        flat, shared = link.flat, link.shared is not None
        offset = 0
        with torch.no_grad():
            for i in self.plan[server]:
                p = self.params[i]
                source = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.data_ptr() == source.data_ptr():
                    continue  # the parameter lives in the shared reply block: the server wrote it there
                if shared and _can_live_in(p, source):
                    p.data = source  # from now on the pull costs no copy (the block is ours until we push)
                else:
                    p.copy_(source, non_blocking=self.pinned)  # host -> GPU from the pinned reply buffer
        if self.pinned:
            torch.cuda.current_stream(self.device).synchronize()  # before the buffer takes the next reply
        return header

    # -- pushes ---------------------------------------------------------------------------------------------

    def before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Accumulate this step's gradient; every ``k``-th step push it and pull (see the strategy)."""
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        if self.local_steps > 1:
            if self.accumulated is None:
                self.accumulated = [torch.zeros_like(p) for p in self.params]
            for total, p in zip(self.accumulated, self.params, strict=True):
                if p.grad is not None:
                    total.add_(p.grad)
        self.local += 1
        if self.local % self.local_steps:
            return  # a local step: the worker's own optimizer applies this gradient
        gradients = self.accumulated or [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params
        ]
        self.exchange(gradients, float(optimizer.param_groups[0]["lr"]), step)
        for p in self.params:
            p.grad = None  # the server applied it: the worker's optimizer.step() does nothing this step
        if self.accumulated is not None:
            for total in self.accumulated:
                total.zero_()

    def exchange(self, gradients: list[torch.Tensor], lr: float, step: int) -> None:
        """Push ``gradients`` (each server its shard, tagged with the version it was computed on) and pull."""
        if self.gate is not None:
            self.gate.before_push(self.replica_index, self.pushes)
        replies = [link.post(f"the pull after push {self.pushes}") for link in self.links]
        if not self._push_buffers:  # the shared push block where the server mapped one
            self._push_buffers = [
                link.shared.push.tensor
                if link.shared is not None
                else torch.empty(link.flat.numel(), pin_memory=self.pinned)
                for link in self.links
            ]
        pending = []
        for server, link in enumerate(self.links):
            indices = self.plan[server]
            payload = self._push_buffers[server]  # reused: the send completes before the next push
            if indices:
                pieces = [gradients[i].detach().reshape(-1).float() for i in indices]
                if self.pinned:  # device -> host before the send (a blocking copy: the send reads it next)
                    payload.copy_(torch.cat(pieces))
                else:
                    torch.cat(pieces, out=payload)
            flag = 0
            if self.compressor is not None and payload.numel():
                sizes = [self.params[i].numel() for i in indices]
                payload = encode_push(self.compressor, f"server{server}", payload, sizes)
                flag = PushFlag.COMPRESSED
            elif link.shared is not None:
                flag = PushFlag.SHARED  # the gradient is in the block already: send the header alone
                self.transport.count_shared(sent=payload.numel() * payload.element_size())
            header = Header(
                Kind.PUSH, version=link.version, step=step, length=payload.numel(), lr=lr,
                flag=int(flag), sender=self.rank,
            )  # fmt: skip
            wire = None if flag == PushFlag.SHARED else payload
            pending += link.send(header, wire)
        self.transport.finish(pending)
        seen = []
        for server, reply in enumerate(replies):
            header = self._receive(server, reply)
            staleness = int(header.staleness) if not header.flag & ReplyFlag.DROPPED else -1
            seen.append(staleness)
            if staleness >= 0:
                self.staleness_window.append(staleness)
        self.staleness_seen.append(seen)
        if self.gate is not None:
            self.gate.after_pull(self.replica_index, self.pushes)
        self.pushes += 1

    def mean_staleness(self) -> float | None:
        """The mean staleness of the pushes since the last call (None if there was none)."""
        if not self.staleness_window:
            return None
        value = sum(self.staleness_window) / len(self.staleness_window)
        self.staleness_window = []
        return value

    # -- checkpoints and the end ----------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Ask every server to checkpoint now (tagged with this worker's step) and record their versions."""
        acks = []
        for server in range(self.servers):
            head = torch.empty(HEADER_SIZE, dtype=torch.float64)
            acks.append((head, self.transport.post_recv(server, head, tag=REPLY, what="the checkpoint ack")))
        pending = []
        for server in range(self.servers):
            header = Header(Kind.CHECKPOINT, step=self.steps_done, sender=self.rank)
            pending += self.transport.isend(server, header, tag=REQUEST)
        self.transport.finish(pending)
        versions = []
        for server, (head, handle) in enumerate(acks):
            header = Header.from_tensor(self.transport.complete(handle, head))
            if header.kind != Kind.ACK:
                raise CommError(
                    f"rank {self.rank}: server rank {server} answered a checkpoint with {header.kind.name}"
                )
            versions.append(header.version)
        state: dict[str, Any] = {
            "server_step": self.steps_done,
            "server_versions": versions,
            "local": self.local,
            "pushes": self.pushes,
        }
        if self.accumulated is not None:
            state["accumulated"] = [t.clone() for t in self.accumulated]
        if self.compressor is not None:
            state["compression"] = self.compressor.state_dict()  # the residuals of this worker's pushes
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint`'s state and pull the servers' (resumed) weights."""
        self.local = int(state["local"])
        self.pushes = int(state["pushes"])
        if self.compressor is not None and "compression" in state:
            self.compressor.load_state_dict(state["compression"])
        if "accumulated" in state:
            self.accumulated = [t.to(self.device, copy=True) for t in state["accumulated"]]
        self.pull(initial=False)  # the trainer just loaded the checkpoint's weights: take the servers'

    def stop_heartbeat(self) -> None:
        self.heartbeat.stop(self.worker_timeout_s)

    def close(self) -> None:
        """Stop the heartbeat and say DONE to every server (a server that is gone needs no goodbye); once."""
        if self.closed:
            return
        self.closed = True
        self.stop_heartbeat()
        for server in range(self.servers):
            with contextlib.suppress(CommError):
                self.transport.send(server, Header(Kind.DONE, sender=self.rank), tag=REQUEST, timeout_s=10)
        for link in self.links:  # names were unlinked at the pull; the mappings go with the tensors
            link.shared = None
        self._push_buffers = []
