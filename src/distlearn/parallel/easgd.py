"""Elastic Averaging SGD (EASGD), synchronous and asynchronous, with or without Nesterov momentum (EAMSGD).

Zhang, Choromanska & LeCun (2015), "Deep learning with Elastic Averaging SGD". Each of ``p`` workers keeps
its own variable ``x^i``; a *centre variable* ``x~`` is tied to them by an elastic force of strength
``rho``. In the paper's notation (``eta`` the learning rate, ``alpha = eta * rho`` the moving rate,
``beta = p * alpha``), the synchronous form (paper eqs. 5-6) is, every ``tau`` steps ::

    x^i <- x^i - alpha * (x^i - x~)                       for every worker i
    x~  <- x~  + alpha * sum_i (x^i - x~)   =   (1 - beta) * x~ + beta * mean_i x^i

and in between each worker takes its own SGD steps ``x^i <- x^i - eta * g^i(x^i)``. The asynchronous form
(paper Algorithm 1, worker ``i`` with its clock ``t^i``) is ::

    x <- x^i                                              (a copy: the gradient and the pull both use it)
    if tau divides t^i:   x^i <- x^i - alpha * (x - x~);  x~ <- x~ + alpha * (x - x~)     (at the server)
    x^i <- x^i - eta * g^i(x);   t^i <- t^i + 1

and momentum EASGD (EAMSGD, paper Algorithm 2) replaces the local step by Nesterov's momentum ``delta`` ::

    v^i <- delta * v^i - eta * g^i(x + delta * v^i);   x^i <- x^i + v^i

How this maps onto the one trainer loop: the gradient is taken at the model's weights, the elastic
difference ``d = alpha * (x - x~)`` is computed in :meth:`before_step` (after backward, before the optimizer
moves anything, so at the same ``x`` as the gradient, as in Algorithm 1), the optimizer takes its step, and
:meth:`after_step` subtracts ``d``. With plain SGD the result is exactly the paper's update. The centre is
updated with the same ``x``: in the synchronous form every rank holds an identical copy of ``x~`` and one
allreduce of the elastic differences ``x^i - x~`` gives every rank their sum; in the asynchronous form the
centre lives on a server rank (rank 0, on the parameter-server core :mod:`distlearn.comm.paramserver`: its
serving loop with the policy :class:`ElasticCentre`), which answers each worker's ``x`` with the current
``x~`` and then moves ``x~ <- x~ + alpha * (x - x~)`` -- one message each way, applied atomically in arrival
order.

Momentum EASGD: pass a Nesterov optimizer (``--optimizer nesterov --optimizer-option momentum=0.9``, or
``torch-sgd`` with ``momentum=0.9 nesterov=true``). Both store the look-ahead point ``y = x + delta * v``
as the model's weights (the gradient is taken there, as Algorithm 2 asks), so the elastic difference must be
taken at ``x = y - delta * v``: we read ``v`` from the optimizer's state (distlearn's ``velocity``, or
``v = -eta * b`` from torch's ``momentum_buffer``) and shift ``y`` by ``-d`` like ``x``, which leaves ``v``
unchanged, as in the paper. Any other optimizer is used as the local step with the difference taken at the
weights.

*Where we differ:* ``alpha`` is computed from the optimizer's current learning rate at each exchange
(``alpha = eta_t * rho``) when ``rho`` is given, so a schedule lowers the elastic step with the gradient step;
``--moving-rate`` fixes ``alpha`` instead (the paper's default is ``beta = 0.9``, i.e. ``alpha = 0.9 / p``,
which is our default). The exchange happens at ``t = 0, tau, 2 tau, ...`` counting from 0, as in the
algorithm. The reported test accuracy is the centre variable's (the paper's, too); module buffers
(BatchNorm statistics) stay local to each worker and the centre is evaluated with rank 0's (sync) or the main
worker's (async) buffers.

Stability: the synchronous centre-to-mean distance is multiplied by ``1 - alpha - beta`` at each exchange and
two workers' distance by ``1 - alpha`` (on a flat loss), so we require ``0 <= alpha < 1`` and
``alpha + beta < 2``. Tuning: ``beta = 0.9``, ``tau = 1 .. 10`` (larger ``tau`` sends fewer messages and lets
the workers explore further); ``rho = 0`` makes the workers independent.

Run it::

    distlearn train --strategy easgd --workers 2 --optimizer sgd --lr 0.05 --elastic-tau 4
    distlearn train --strategy easgd --easgd-mode async --workers 3 ...    # rank 0 holds the centre
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from distlearn.comm.p2p import REQUEST, Header, Kind, Transport
from distlearn.comm.paramserver import PushFlag, ServerLink, ServingLoop, StalenessBook
from distlearn.comm.traffic import ring_allreduce_bytes
from distlearn.errors import CommError, ConfigError
from distlearn.launch import DistContext, shutdown
from distlearn.parallel.base import Strategy, StrategyOptions, StrategyStats

__all__ = ["ElasticAveraging", "ElasticCentre", "lookahead_offset"]


def lookahead_offset(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """``x - y`` for a Nesterov optimizer that stores the look-ahead point ``y = x + delta * v``; else None.

    distlearn's ``Nesterov`` gives ``v`` from :meth:`~distlearn.optim.Nesterov.velocity`;
    ``torch.optim.SGD(nesterov=True)`` keeps ``b`` with ``v = -eta * b``. Both give ``x - y = -delta * v``.
    """
    from distlearn.optim.first_order import Nesterov

    state = optimizer.state.get(param, {})
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if isinstance(optimizer, Nesterov):
        velocity = optimizer.velocity(param)
        return None if velocity is None else -group["momentum"] * velocity
    if isinstance(optimizer, torch.optim.SGD) and group.get("nesterov") and group["momentum"]:
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            return group["momentum"] * group["lr"] * buffer
    return None


def is_nesterov(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer`` is one of the two Nesterov forms :func:`lookahead_offset` understands."""
    from distlearn.optim.first_order import Nesterov

    if isinstance(optimizer, Nesterov):
        return True
    return isinstance(optimizer, torch.optim.SGD) and any(
        g.get("nesterov") and g["momentum"] for g in optimizer.param_groups
    )


@dataclass
class EASGDOptions(StrategyOptions):
    """Options of elastic averaging SGD (``--strategy easgd``)."""

    easgd_mode: Literal["sync", "async"] = "sync"
    """sync (allreduce, the centre replicated) or async (rank 0 holds the centre)"""
    elastic_rho: float | None = None
    """elastic coefficient rho; moving rate alpha = lr * rho"""
    moving_rate: float | None = None
    """the moving rate alpha itself (default 0.9 / workers)"""
    elastic_tau: int = 1
    """steps between elastic exchanges (tau)"""

    aliases: ClassVar[dict[str, str]] = {
        **StrategyOptions.aliases,
        "mode": "easgd_mode",
        "rho": "elastic_rho",
        "tau": "elastic_tau",
    }

    def cuda_refusal(self) -> str:
        if self.easgd_mode != "async":
            return ""  # sync mode allreduces the elastic differences on the device
        return (
            "asynchronous EASGD's centre rank and workers exchange weights as CPU tensors over gloo "
            "point-to-point, one request at a time; use --easgd-mode sync (an allreduce on the device) to "
            "train on GPUs, or --device cpu"
        )

    def validate(self) -> None:
        super().validate()
        if self.easgd_mode not in ("sync", "async"):
            raise ConfigError(f"--easgd-mode must be sync or async, got {self.easgd_mode!r}")
        rho, moving_rate, tau = self.elastic_rho, self.moving_rate, self.elastic_tau
        if rho is not None and moving_rate is not None:
            raise ConfigError("give --elastic-rho (alpha = lr * rho) or --moving-rate (alpha), not both")
        if rho is not None and rho < 0:
            raise ConfigError(f"--elastic-rho must be >= 0 (0: independent workers), got {rho}")
        if moving_rate is not None and not 0 <= moving_rate < 1:
            raise ConfigError(f"--moving-rate alpha must be in [0, 1), got {moving_rate}; try 0.9 / workers")
        if not isinstance(tau, int) or tau < 1:
            raise ConfigError(f"--elastic-tau must be an integer >= 1 (steps between exchanges), got {tau!r}")

    def batch_takers(self, processes: int) -> int:
        """The workers: every rank in sync mode, all but the centre (rank 0) in async mode."""
        return processes - 1 if self.easgd_mode == "async" else processes

    def idle_ranks(self, processes: int) -> tuple[int, ...]:
        return (0,) if self.easgd_mode == "async" else ()  # the centre rank

    def check_job(self, run: Any, processes: int) -> None:
        if self.easgd_mode == "async" and processes < 2:
            raise ConfigError("--easgd-mode async needs a centre rank and a worker: use --workers 2 or more")
        super().check_job(run, processes)


class ElasticAveraging(Strategy):
    """EASGD / EAMSGD in the synchronous (allreduce) or asynchronous (centre on rank 0) form.

    Options: :class:`EASGDOptions`: ``easgd_mode`` ``"sync"`` (every rank a worker, the centre
    replicated) or ``"async"`` (rank 0 holds the centre, ranks ``1 .. p`` are workers); ``elastic_rho``
    (``alpha = eta_t * rho`` with ``eta_t`` the optimizer's current rate) or ``moving_rate`` (``alpha``
    directly; default ``0.9 / p``, i.e. ``beta = 0.9``); ``elastic_tau``, the communication period.
    """

    name = "easgd"

    Options = EASGDOptions

    def __init__(self, options: EASGDOptions | None = None, /, *, run: Any = None, **fields: Any) -> None:
        super().__init__(options, run=run, **fields)
        self.mode = self.options.easgd_mode
        self.rho = self.options.elastic_rho
        self.moving_rate = self.options.moving_rate
        self.tau = self.options.elastic_tau
        self.transport: Transport | None = None
        self.centre: torch.Tensor | None = None  # sync: this rank's copy of x~ (flat float32)
        self.exchanges = 0
        self.bytes_sent = 0
        self._params: list[torch.Tensor] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: torch.Tensor | None = None  # alpha * (x - x~), subtracted after the optimizer step
        self._eval_model: nn.Module | None = None
        self._context: DistContext | None = None
        self._owns_group = False
        self.server_report: dict[str, Any] = {}
        self._centre_link: ServerLink | None = None  # async workers: the link to the centre rank

    # -- roles --------------------------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """``p``, the number of workers (every rank in sync mode, all but rank 0 in async mode)."""
        return self.world_size - 1 if self.mode == "async" else self.world_size

    @property
    def replicas(self) -> int:
        return max(1, self.workers)

    @property
    def replica_index(self) -> int:
        return max(0, self.rank - 1) if self.mode == "async" else self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == (1 if self.mode == "async" else 0)

    def alpha(self, lr: float) -> float:
        """The moving rate ``alpha`` for the current learning rate ``lr``."""
        if self.rho is not None:
            value = lr * self.rho
        elif self.moving_rate is not None:
            value = self.moving_rate
        else:
            value = 0.9 / self.replicas
        beta = value * (self.replicas if self.mode == "sync" else 1)
        if not 0 <= value < 1 or value + beta >= 2:
            raise ConfigError(
                f"EASGD moving rate alpha = {value:g} (beta = p * alpha = {beta:g}) is unstable: need "
                "0 <= alpha < 1 and alpha + beta < 2; lower --elastic-rho or --lr, or set --moving-rate"
            )
        return value

    # -- life cycle ---------------------------------------------------------------------------------------

    def setup(self, seed: int) -> None:
        usage = (
            "runs one process per worker (and a centre rank in async mode): use `distlearn "
            "train --strategy easgd --workers N`, or start the job with torchrun"
        )
        if not self.join_job(usage, self.timeout_s):
            return
        if self.mode == "async":
            if self.world_size < 2:
                raise ConfigError(
                    "--easgd-mode async needs a centre rank and a worker: use --workers 2 or more"
                )
            self.role = "server" if self.rank == 0 else "worker"
            self.transport = Transport(self.rank, timeout_s=self.timeout_s)
        self.alpha(0.0 if self.rho is not None else 1.0)  # validates moving_rate against p now

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._optimizer = optimizer
        flat = self._flat_params()
        if self.mode == "sync":
            self.start_from_rank0(model)
            self.centre = self._flat_params()  # x~ = x^i at the start (Algorithm 1's initialisation)
        else:
            assert self.transport is not None
            self._centre_link = ServerLink(self.transport, 0, flat.numel())
            centre = self._request(Kind.INIT, flat)  # the first worker's weights become the centre
            self._load(centre)
        self._eval_model = copy.deepcopy(model)
        return model, optimizer

    def barrier(self) -> None:
        if self._context is not None and self.world_size > 1 and self.mode == "sync":
            self._wait(dist.barrier(async_op=True), "barrier")

    def close(self) -> None:
        if self.mode == "async" and self.role == "worker" and self.transport is not None and self._context:
            with contextlib.suppress(CommError):  # a centre that is gone needs no goodbye
                self.transport.send(0, Header(Kind.DONE, sender=self.rank), tag=REQUEST, timeout_s=10)
        if self._owns_group:
            shutdown()
            self._owns_group = False
        self._context = None

    # -- the step -----------------------------------------------------------------------------------------

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params]).float()

    def _local_variable(self) -> torch.Tensor:
        """``x^i``: the weights, minus the look-ahead of a Nesterov optimizer (EAMSGD)."""
        assert self._optimizer is not None
        pieces = []
        for p in self._params:
            offset = lookahead_offset(self._optimizer, p)
            value = p.detach() if offset is None else p.detach() + offset
            pieces.append(value.reshape(-1))
        return torch.cat(pieces).float()

    def _load(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self._params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """When ``tau`` divides ``t``: ``alpha * (x - x~)`` at the gradient's ``x``; move the centre."""
        if step % self.tau:
            return
        alpha = self.alpha(float(optimizer.param_groups[0]["lr"]))
        x = self._local_variable()
        if self.mode == "sync":
            assert self.centre is not None
            difference = x - self.centre  # x^i - x~
            total = difference.clone()
            if self.world_size > 1:
                self._wait(dist.all_reduce(total, async_op=True), "allreduce of the elastic differences")
                self.bytes_sent += ring_allreduce_bytes(total.numel(), total.element_size(), self.world_size)
            self.centre.add_(total, alpha=alpha)  # x~ <- x~ + alpha * sum_i (x^i - x~)
        else:
            centre = self._request(Kind.PUSH, x, lr=alpha, step=step)  # the server applies its own update
            difference = x - centre
        self._pending = difference.mul_(alpha)
        self.exchanges += 1

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """``x^i <- x^i - alpha * (x - x~)`` (after the optimizer's own step, as in Algorithm 1)."""
        if self._pending is None:
            return
        offset = 0
        with torch.no_grad():
            for p in self._params:
                p.sub_(self._pending[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self._pending = None

    def waits_for_all(self, step: int) -> bool:
        """The synchronous form's exchange steps allreduce; the asynchronous form waits for nobody."""
        return self.mode == "sync" and self.world_size > 1 and step % self.tau == 0

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The centre variable ``x~`` in a copy of the model (rank 0's buffers)."""
        assert self._eval_model is not None
        read_only = PushFlag.READ_ONLY
        centre = self.centre if self.mode == "sync" else self._request(Kind.PUSH, None, flag=read_only)
        assert centre is not None
        self._eval_model.load_state_dict(model.state_dict())
        offset = 0
        with torch.no_grad():
            for p in (q for q in self._eval_model.parameters() if q.requires_grad):
                p.copy_(centre[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return self._eval_model

    # -- async: talking to the centre ---------------------------------------------------------------------

    def _request(
        self, kind: Kind, x: torch.Tensor | None, *, lr: float = 0.0, step: int = 0, flag: int = 0
    ) -> torch.Tensor:
        """Send ``x`` to the centre rank and return the centre it answers with (before its update).

        The result is the link's reply buffer: valid until the next request.
        """
        assert self.transport is not None and self._centre_link is not None
        link = self._centre_link
        size = link.flat.numel()
        posted = link.post("the centre's reply")
        length = 0 if x is None else x.numel()
        header = Header(kind, step=step, length=length, lr=lr, flag=int(flag), sender=self.rank)
        self.transport.finish(link.send(header, x))

        def refused(answer: Header) -> Exception:
            return ConfigError(
                f"the centre rank answered {answer.kind.name} of {answer.length} numbers to a model of "
                f"{size}: every process must build the same --model"
            )

        link.receive(posted, refused)
        return link.flat

    def serve(self) -> None:
        """Rank 0 in async mode: hold ``x~`` and answer each worker's ``x`` until every worker is done."""
        assert self.transport is not None
        centre = ElasticCentre(self.rank, self.timeout_s)
        loop = ServingLoop(self.transport, range(1, self.world_size), centre, silence_s=self.timeout_s)
        loop.run()
        self.server_report = {"updates": centre.book.version, "seconds": loop.seconds()}

    # -- metrics and checkpoints --------------------------------------------------------------------------

    def stats(self) -> StrategyStats:
        sent = self.transport.bytes_sent if self.transport is not None else self.bytes_sent
        return {"bytes_sent": int(sent)}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"exchanges": self.exchanges}
        if self.centre is not None:
            state["centre"] = self.centre.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.exchanges = int(state.get("exchanges", 0))
        if "centre" in state:
            self.centre = state["centre"].to(self.device, copy=True)  # x~ lives where the weights do

    def describe(self) -> str:
        rate = f"rho={self.rho:g}" if self.rho is not None else f"alpha={self.alpha(1.0):g}"
        momentum = (
            ", Nesterov momentum (EAMSGD)"
            if self._optimizer is not None and is_nesterov(self._optimizer)
            else ""
        )
        where = f"rank {self.rank} {self.role}"
        return f"easgd ({self.mode}, {self.workers} workers, tau={self.tau}, {rate}{momentum}; {where})"


class ElasticCentre:
    """The centre variable ``x~`` of asynchronous EASGD: the :class:`~distlearn.comm.paramserver.ServerPolicy`
    of rank 0.

    The first INIT's variable becomes ``x~``. A PUSH of ``x`` with ``alpha`` in its ``lr`` is answered with
    the current ``x~``, then ``x~ <- x~ + alpha * (x - x~)`` (paper Algorithm 1, the server's half); a
    ``READ_ONLY`` push is answered without moving ``x~``. Each move is one version of the
    :class:`~distlearn.comm.paramserver.StalenessBook` (no staleness is recorded: a worker's elastic
    difference is taken against the centre it is answered with, not the one it last saw).
    """

    def __init__(self, rank: int, timeout_s: float) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self.centre: torch.Tensor | None = None
        self.book = StalenessBook(keep_updates=False)
        self._received: torch.Tensor | None = None

    def on_request(self, loop: ServingLoop, peer: int, header: Header) -> None:
        if header.kind not in (Kind.INIT, Kind.PUSH):
            raise CommError(f"centre rank {self.rank}: unexpected {header.kind.name} from rank {peer}")
        received = self._received
        if header.length:
            if received is None or received.numel() != header.length:
                received = self._received = torch.empty(header.length, dtype=torch.float32)
            loop.receive(peer, header, received, what="a worker's variable")
        if self.centre is None:
            if header.kind != Kind.INIT or received is None:
                raise CommError(
                    f"centre rank {self.rank}: rank {peer} sent {header.kind.name} before any INIT"
                )
            self.centre = received.clone()  # x~ starts at the first worker's weights
        centre = self.centre
        if header.length and header.length != centre.numel():
            loop.reply(peer, Header(Kind.ERROR, sender=self.rank))
            raise ConfigError(
                f"centre rank {self.rank}: rank {peer} sent {header.length} numbers for a centre of "
                f"{centre.numel()}; every process must build the same --model"
            )
        reply = Header(Kind.PARAMS, version=self.book.version, length=centre.numel(), sender=self.rank)
        loop.reply(peer, reply, centre)
        if header.kind == Kind.PUSH and not header.flag & PushFlag.READ_ONLY and received is not None:
            centre.add_(received - centre, alpha=header.lr)  # x~ <- x~ + alpha * (x - x~)
            self.book.applied([])

    def after_message(self, loop: ServingLoop) -> None:
        """Nothing waits: every push was applied as it came."""

    def on_lost(self, loop: ServingLoop, worker: int, why: str) -> None:
        raise CommError(
            f"centre rank {self.rank}: worker rank {worker} {why}; the job cannot go on without it"
        )

    def on_silence(self, loop: ServingLoop, error: CommError | None) -> None:
        if error is not None:
            raise error
        raise CommError(
            f"centre rank {self.rank}: no worker spoke for {self.timeout_s:g} s (still expected: "
            f"{sorted(loop.live)}); the workers have probably died"
        )
