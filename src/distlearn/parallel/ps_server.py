"""The server side of ``--strategy ps``: the policy that gives a push its meaning on a Downpour server.

:class:`DownpourServer` is the :class:`~distlearn.comm.paramserver.ServerPolicy` of the ps strategy: it holds
this server's shard (one flat buffer whose 1-D views are the optimizer's parameters), runs the optimizer on
it, groups pushes (n-softsync, or the first ``R`` of backup workers), drops late pushes (backup workers),
decodes compressed pushes, and saves and reports the server's state. The conversation itself (who is live,
heartbeats, shared blocks, replies) is the core's :class:`~distlearn.comm.paramserver.ServingLoop`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distlearn import optim
from distlearn.checkpoint import write_verified
from distlearn.comm.p2p import Header, Kind, Transport
from distlearn.comm.paramserver import PushFlag, ReplyFlag, ServingLoop, StalenessBook
from distlearn.errors import CheckpointError, CommError
from distlearn.parallel.ps_codecs import decode_push, make_push_codec

__all__ = ["DownpourServer", "ServerSettings"]


def _log(message: str) -> None:
    print(f"[distlearn ps] {message}", file=sys.stderr, flush=True)


@dataclass
class ServerSettings:
    """What a Downpour server needs of the options of :class:`distlearn.parallel.ps.ParameterServer`."""

    group_size: int  # gradients per update: n (softsync) or R (backup workers)
    backup_workers: int
    staleness_aware: bool
    optimizer_spec: str | Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    lr: float | None
    optimizer_options: dict[str, Any]
    shared_memory: bool
    compression: str
    compression_options: dict[str, Any]
    out: Path | None
    resume: str | Path | None
    keep_checkpoints: int


@dataclass
class _Pending:
    """A push waiting for its group: who sent it, on which version, its staleness, gradient and lr."""

    worker: int
    version: int
    staleness: float
    gradient: torch.Tensor
    lr: float


class DownpourServer:
    """One server of the ps strategy: its shard, optimizer, staleness book and pending group."""

    def __init__(self, settings: ServerSettings, rank: int) -> None:
        self.s = settings
        self.rank = rank
        self.book = StalenessBook()
        self.sizes: list[int] | None = None
        self.flat: torch.Tensor | None = None
        self.grad_flat: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.tensors: list[torch.Tensor] = []  # the optimizer's parameters: views of `flat`
        self._grads_on: torch.Tensor | None = None  # what their gradients are views of
        self.pending: list[_Pending] = []
        self.free: list[torch.Tensor] = []  # gradient buffers to reuse once their group is applied
        self.decoder = (
            make_push_codec(settings.compression, settings.compression_options)
            if settings.compression != "none"
            else None
        )
        self.loop: ServingLoop | None = None
        self._restore()

    def run(self, transport: Transport, workers: range, worker_timeout_s: float) -> None:
        """Serve ``workers`` until every one is done or dead (the caller writes :meth:`report`)."""
        self.loop = ServingLoop(
            transport, workers, self, silence_s=worker_timeout_s, worker_silence_s=worker_timeout_s
        )
        self.loop.run()

    # state -------------------------------------------------------------------------------------------------

    def _checkpoint_dir(self) -> Path | None:
        return None if self.s.out is None else self.s.out / "checkpoints"

    def _file(self, directory: Path, step: int) -> Path:
        return directory / f"ps-server{self.rank}-step{step:08d}.pt"

    def _restore(self) -> None:
        if self.s.resume is None:
            return
        from distlearn.checkpoint import latest_checkpoint, load_checkpoint, read_verified

        path = Path(self.s.resume)
        if path.is_dir():
            path = latest_checkpoint(path) or path
        state = load_checkpoint(path)["strategy"]
        if "server_step" not in state:
            raise CheckpointError(f"{path} was not written by a ps run (no server_step); drop --resume")
        file = self._file(path.parent, int(state["server_step"]))
        if not file.is_file():
            raise CheckpointError(
                f"server rank {self.rank}: {file} is missing -- the worker checkpoint {path} needs the "
                "servers' files written with it; copy them next to it or resume from an older checkpoint"
            )
        saved = read_verified(file)  # its checksum first: a damaged file is a CheckpointError naming it
        self._build([int(n) for n in saved["sizes"].tolist()])
        assert self.flat is not None and self.optimizer is not None
        self.flat.copy_(saved["flat"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.book.load(saved)
        _log(f"server rank {self.rank} resumed from {file} at version {self.book.version}")

    def _build(self, sizes: list[int]) -> None:
        self.sizes = sizes
        total = sum(sizes)
        self.flat = torch.zeros(total, dtype=torch.float32)
        self.grad_flat = torch.zeros(total, dtype=torch.float32)
        tensors = []
        offset = 0
        for n in sizes:
            tensor = self.flat[offset : offset + n]
            tensor.requires_grad_(True)
            tensor.grad = self.grad_flat[offset : offset + n]
            tensors.append(tensor)
            offset += n
        self.tensors, self._grads_on = tensors, self.grad_flat
        spec = self.s.optimizer_spec
        if callable(spec):
            self.optimizer = spec(tensors)
        else:
            self.optimizer = optim.create(spec, tensors, lr=self.s.lr, **self.s.optimizer_options)

    def state(self) -> dict[str, Any]:
        assert self.flat is not None and self.optimizer is not None and self.sizes is not None
        return {
            "sizes": torch.tensor(self.sizes, dtype=torch.int64),
            "flat": self.flat.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            **self.book.state(),
        }

    def save(self, step: int) -> None:
        directory = self._checkpoint_dir()
        if directory is None or self.flat is None:
            return
        write_verified(self.state(), self._file(directory, step))  # atomic and checksummed
        mine = sorted(directory.glob(f"ps-server{self.rank}-step*.pt"))
        for old in mine[: -self.s.keep_checkpoints]:
            old.unlink(missing_ok=True)

    def report(self) -> dict[str, Any]:
        loop = self.loop
        return {
            "rank": self.rank,
            **self.book.summary(),
            "done_workers": loop.done if loop is not None else [],
            "dead_workers": loop.dead if loop is not None else [],
            "lost_workers": loop.lost if loop is not None else [],
            "seconds": loop.seconds() if loop is not None else 0.0,
        }

    def write_report(self, report: dict[str, Any]) -> None:
        if self.s.out is None:
            return
        self.s.out.mkdir(parents=True, exist_ok=True)
        (self.s.out / f"ps-server{self.rank}.json").write_text(json.dumps(report, indent=1))
        if self.flat is not None:
            write_verified(self.state(), self.s.out / f"ps-server{self.rank}-final.pt")

    # the policy --------------------------------------------------------------------------------------------

    def on_lost(self, loop: ServingLoop, worker: int, why: str) -> None:
        # its pending gradient, if any, still counts; it is just not answered
        step = loop.last_step.get(worker)
        after = f"after its push of step {step}" if step is not None else "before its first push"
        _log(
            f"server rank {self.rank}: worker rank {worker} lost {loop.seconds():.1f} s into serving, "
            f"{after}: {why}; continuing with {len(loop.live)} worker(s) at version {self.book.version}"
        )

    def on_silence(self, loop: ServingLoop, error: CommError | None) -> None:
        if error is not None:
            raise error
        loop.lose_all(f"silent for {loop.silence_s:g} s")  # every live worker is dead

    def _params_header(self, staleness: float = 0.0, dropped: bool = False, accepted: bool = False) -> Header:
        assert self.flat is not None
        flag = (ReplyFlag.DROPPED if dropped else 0) | (ReplyFlag.SHARED_ACCEPTED if accepted else 0)
        return Header(Kind.PARAMS, version=self.book.version, length=self.flat.numel(), staleness=staleness,
                      flag=int(flag), sender=self.rank)  # fmt: skip

    def on_request(self, loop: ServingLoop, peer: int, header: Header) -> None:
        kind = header.kind
        if kind == Kind.CHECKPOINT:
            self.save(header.step)
            loop.reply(peer, Header(Kind.ACK, version=self.book.version, step=header.step, sender=self.rank))
        elif kind == Kind.INIT:
            self._init(loop, peer, header)
        elif kind == Kind.PUSH:
            self._push(loop, peer, header)
        else:
            raise CommError(f"server rank {self.rank}: unexpected {kind.name} from rank {peer}")

    def _init(self, loop: ServingLoop, peer: int, header: Header) -> None:
        """A worker's layout and initial values (the first INIT sets the shard); answer with the shard."""
        payload = loop.receive(peer, header, what="an initial shard")
        count = header.flag
        sizes = [int(n) for n in payload[:count].tolist()]
        if self.flat is None:
            self._build(sizes)
            assert self.flat is not None
            self.flat.copy_(payload[count:].float())
        if sizes != self.sizes:
            loop.refuse_layout(peer)
            return
        assert self.flat is not None
        token, known = header.step, loop.shared.get(peer)
        if known is not None and known.token == token:  # a pull after resuming: the blocks are mapped
            loop.reply(peer, self._params_header(accepted=True), self.flat)
            return
        accepted = bool(token) and self.s.shared_memory and loop.shared.attach(peer, token, self.flat.numel())
        loop.reply(peer, self._params_header(accepted=accepted), self.flat, shared=False)

    def _push(self, loop: ServingLoop, peer: int, header: Header) -> None:
        """A gradient: drop it if late (backup workers), else add it to the pending group."""
        if header.flag == PushFlag.COMPRESSED:
            wire = loop.receive(peer, header, what="a compressed gradient")
            self.book.received()
            if self.decoder is None or self.flat is None:
                loop.refuse_layout(peer)
                return
            gradient = decode_push(self.decoder, wire, self.sizes or [])
            header = Header(header.kind, header.version, header.step, gradient.numel(), header.lr)
        elif header.flag & PushFlag.SHARED:
            gradient = loop.receive(peer, header)  # read in place: the worker waits for the reply to write
            self.book.received()
        else:
            reuse = self.free.pop() if self.free and self.free[-1].numel() == header.length else None
            gradient = loop.receive(peer, header, reuse, what="a gradient")
            self.book.received()
        if self.flat is None or header.length != self.flat.numel():
            loop.refuse_layout(peer)
            return
        staleness = self.book.staleness(header.version)
        if self.s.backup_workers and self.book.is_late(header.version):
            self.book.drop(header.version)
            loop.reply(peer, self._params_header(staleness, dropped=True), self.flat)
            return
        self.pending.append(_Pending(peer, header.version, float(staleness), gradient, header.lr))

    def after_message(self, loop: ServingLoop) -> None:
        """Apply the pending group once it has ``n`` gradients, or every live worker's (the rest are dead)."""
        if not self.pending:
            return
        waiting_live = sum(1 for entry in self.pending if entry.worker in loop.live)
        need = min(self.s.group_size, max(1, len(loop.live)))
        if len(self.pending) < need and waiting_live < len(loop.live):
            return
        group = sorted(self.pending, key=lambda entry: entry.worker)
        self.pending = []
        self._apply(loop, group)

    def _grads_from(self, source: torch.Tensor) -> None:
        """Make the optimizer's gradients views of ``source`` (a pushed gradient, or the group's mean).

        Saves one copy of the shard per update when a single gradient is applied as it came (from a shared
        block, or the receive buffer). An optimizer that keeps its own flat gradient (``flat=True``) copies
        replaced gradients back in itself, so the result is the same either way.
        """
        if source is self._grads_on:
            return
        offset = 0
        for tensor in self.tensors:
            tensor.grad = source[offset : offset + tensor.numel()]
            offset += tensor.numel()
        self._grads_on = source

    def _apply(self, loop: ServingLoop, group: list[_Pending]) -> None:
        """``w <- w - eta * u((1/n) sum_l g_l / s_l)`` in worker order; answer the group's live workers."""
        assert self.optimizer is not None and self.grad_flat is not None and self.flat is not None
        scales = [1.0 / max(1.0, entry.staleness) if self.s.staleness_aware else 1.0 for entry in group]
        if len(group) == 1 and scales[0] == 1.0:
            self._grads_from(group[0].gradient)  # one gradient as it is: the optimizer reads it where it lies
        else:
            self._grads_from(self.grad_flat)
            for index, (entry, scale) in enumerate(zip(group, scales, strict=True)):
                if index == 0:
                    if scale != 1.0:
                        torch.mul(entry.gradient, scale, out=self.grad_flat)
                    else:
                        self.grad_flat.copy_(entry.gradient)
                else:
                    self.grad_flat.add_(entry.gradient, alpha=scale)
            if len(group) > 1:
                self.grad_flat.div_(len(group))
        for entry in group:
            if not loop.shared.is_push_block(entry.gradient):
                self.free.append(entry.gradient)  # a worker's shared block is not ours to reuse
        lrs = [entry.lr for entry in group if entry.lr > 0]
        if lrs:
            lr = sum(lrs) / len(lrs)
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = lr
        self.optimizer.step()
        self.book.applied([(entry.worker, int(entry.staleness)) for entry in group])
        for entry in group:
            if entry.worker in loop.live:
                loop.reply(entry.worker, self._params_header(entry.staleness), self.flat)
