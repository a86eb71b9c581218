"""A few lines in a user's own training loop, in the manner of DDP and Horovod::

    import distlearn
    model, optimizer = distlearn.parallelize(model, optimizer, strategy="sync", reducer="ring")
    sampler = torch.utils.data.DistributedSampler(dataset)   # this replica's shard (torch's own)
    for x, y in DataLoader(dataset, batch_size=M, sampler=sampler):
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()

Run the script with ``torchrun --nproc-per-node R script.py``, or with plain ``python script.py``: with no
job to join, :func:`parallelize` makes a local process group of one process and the strategy runs with
``R = 1`` (sync, local SGD, sync EASGD; ``ps`` and async EASGD need a server rank and 2 processes or more,
and say so with a ConfigError naming torchrun). It joins the job, checks that every rank built the same
model, broadcasts rank 0's weights and installs the strategy's hooks around ``optimizer.step()`` with
torch's own ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``: before the step the
strategy combines gradients (sync: waits for the bucket allreduces started during backward; ps: push and
pull), after it the strategy combines weights (local SGD, EASGD).

What comes back: the same ``model`` object (``model(x)``, ``model.parameters()``, its ``state_dict()`` are
unchanged) with a ``no_sync()`` method bound to it, and the same ``optimizer`` with the strategy attached as
``optimizer.distlearn_strategy`` (its ``stats()`` give bytes sent; call its ``close()`` at the end).

The rules, beside DDP's:

* **Gradient accumulation.** Gradients are combined once per ``optimizer.step()``, from what backward
  accumulated in ``param.grad``. ``with model.no_sync(): loss.backward()`` accumulates locally with no
  communication (as DDP's); the next backward outside it starts the buckets' allreduces (overlap). Several
  backward passes outside ``no_sync`` before one step also work with any number of buckets: the first time
  it happens the sync strategy stops overlapping and reduces at the step. Either way the step uses the mean
  over replicas of the summed micro-batch gradients, as DDP does (divide each micro-batch's loss by the
  number of micro-batches for the mean).
* **Checkpoints.** ``optimizer.state_dict()`` carries the strategy's state under the key ``"distlearn"``
  (codec residuals, PowerSGD's ``Q``, local SGD's and EASGD's counters, EASGD's centre, the step count), and
  ``optimizer.load_state_dict()`` restores it, so saving ``model.state_dict()`` and
  ``optimizer.state_dict()`` and loading them into a fresh model, optimizer and :func:`parallelize` resumes
  bitwise (the data of each step is the user's to regenerate). The parameter server keeps its weights and
  its optimizer state on the servers (async EASGD its centre on rank 0): a worker's
  ``optimizer.state_dict()`` holds only the step count, and ``optimizer.load_state_dict()`` of such a state
  past step 0 raises ConfigError (a worker's next exchange would silently replace what was loaded);
  resumable ps runs are ``distlearn train --strategy ps --resume``, resumable EASGD is the sync mode. Load
  the optimizer's state *after* :func:`parallelize` (torch's own ``load_state_dict`` ignores the
  ``"distlearn"`` entry).
* **The process group.** Under torchrun the first :func:`parallelize` joins the job's default group (unless
  the script made it) and keeps it past ``close()``: a later :func:`parallelize` in the same process reuses
  it (joining again on the same rendezvous store could read the old group's stale addresses and fail to
  connect), and it is left at interpreter exit. A group the script made itself is the script's to destroy.
* **Server ranks.** Strategies with processes that do not train (``ps``: ranks ``0 .. servers-1``; EASGD
  async: rank 0) serve inside :func:`parallelize` until every worker has closed its strategy, and then the
  process exits (``SystemExit(0)``): the rest of the user's script runs on the worker ranks only. Workers
  must call ``optimizer.distlearn_strategy.close()`` when they are done (that ends the servers).
* **The device.** The replica computes where the model is (``device=`` may say so, and must agree):
  NCCL for a model on ``cuda:k``, gloo for one on the CPU; the parameter server always uses gloo (its
  servers stay on the CPU; a CUDA worker stages its payloads through pinned host memory). Hogwild! and
  asynchronous EASGD refuse a CUDA model with a ConfigError saying why.
* **Mixed precision.** bf16 needs nothing: run the forward pass and the loss under
  ``torch.autocast(device_type, dtype=torch.bfloat16)``. fp16 with a loss scaler: pass it to
  ``parallelize(..., grad_scaler=scaler)`` (strategies ``sync`` and ``ddp``) and combine the gradients
  before the scaler reads them::

      scaler = torch.amp.GradScaler("cuda")
      model, optimizer = distlearn.parallelize(model, optimizer, compression="topk", grad_scaler=scaler)
      with torch.autocast("cuda", dtype=torch.float16):
          loss = loss_fn(model(x), y)
      scaler.scale(loss).backward()
      optimizer.combine_gradients()      # waits for the buckets; with a codec: unscaled before encoding
      scaler.unscale_(optimizer)         # optional, for clipping: clip_grad_norm_(model.parameters(), c)
      scaler.step(optimizer)             # skipped alike on every rank when any rank had inf/NaN
      scaler.update()
      optimizer.zero_grad()

  ``optimizer.step()`` without a ``combine_gradients()`` before it raises ConfigError (the scaler would
  have read uncombined gradients). Save ``scaler.state_dict()`` beside the optimizer's to resume exactly.
* **Hogwild!** shares one model between local processes and keeps its own entry point
  (``distlearn train --strategy hogwild``, :func:`distlearn.parallel.hogwild.launch_hogwild`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlearn.devices import module_device, resolve_device
from distlearn.errors import ConfigError
from distlearn.launch import in_torchrun
from distlearn.parallel import create_strategy

__all__ = ["parallelize"]

STATE_KEY = "distlearn"
"""The key of ``optimizer.state_dict()`` that holds the strategy's state and the step count."""


def _served(strategy: Any) -> str:
    """Who holds the state of a strategy with server ranks (ps, async EASGD), else ``""``."""
    if strategy.name == "ps":
        return "the parameter server's rank 0 serves and the workers are ranks 1 and up"
    if strategy.name == "easgd" and getattr(strategy.options, "easgd_mode", None) == "async":
        return "asynchronous EASGD's rank 0 holds the centre and the workers are ranks 1 and up"
    return ""


def _check_alone(strategy: Any) -> None:
    """ConfigError for a strategy with server ranks in a script started without torchrun (one process)."""
    if in_torchrun() or (dist.is_available() and dist.is_initialized()) or not _served(strategy):
        return
    raise ConfigError(
        f"strategy {strategy.name!r} needs 2 processes or more ({_served(strategy)}), but this "
        "script was started as one process; start it with `torchrun --nproc-per-node 2 script.py` "
        "(or more processes)"
    )


def _join_alone(backend: str, device: torch.device) -> bool:
    """With no torchrun job and no process group: a local group of one process (True when made here)."""
    if in_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def _check_device(model: nn.Module, optimizer: torch.optim.Optimizer, device: Any) -> torch.device:
    """The device of the replica: the model's, which ``device=`` (if given) must name; ConfigError if not."""
    where = module_device(model) or torch.device("cpu")
    if device is not None:
        wanted = resolve_device(device)
        if wanted != where:
            raise ConfigError(
                f"parallelize(device={str(device)!r}) means {wanted}, but the model is on {where}; move it "
                f"first (model.to({str(wanted)!r}), then build the optimizer on model.parameters()), as "
                "torch's DDP asks, or leave device= out to follow the model"
            )
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != where:
                raise ConfigError(
                    f"the optimizer's state {name!r} is on {value.device} but the model is on {where}; build "
                    "(or load) the optimizer after moving the model"
                )
    return where


def parallelize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy: str = "sync",
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    grad_scaler: Any = None,
    **options: Any,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Make ``model`` and ``optimizer`` train as one replica of ``strategy`` (see the module docstring).

    ``strategy`` is a name of :data:`distlearn.parallel.STRATEGIES` or an import path ``module:Class``;
    ``options`` are the fields of its options dataclass, under the names of the ``distlearn train`` flags
    (``reducer``, ``bucket_mb``, ``compression``, ``density``, ``average_every``, ``staleness_aware``,
    ``comm_timeout``, ...; the older ``timeout_s``, ``period`` are accepted too; an unknown one raises
    ConfigError listing them), or ``options=`` an instance of it; for ``ps`` also ``optimizer=``/``lr=``
    (the servers' optimizer; default: the name and rate of ``optimizer``'s class when it is
    ``torch.optim.SGD``).

    ``device``: where the replica computes. By default the model's (its first parameter's): a model on
    ``cuda:k`` communicates over NCCL, one on the CPU over gloo. Given (``"cpu"``, ``"cuda"`` for
    ``cuda:LOCAL_RANK``, ``"cuda:1"``, a ``torch.device``), it must be where the model already is, as for
    torch's DDP (the optimizer holds the model's parameters there): a model elsewhere is a ConfigError
    saying to move it first.

    ``grad_scaler``: the ``torch.amp.GradScaler`` of an fp16 loop (sync and ddp; see
    "Mixed precision" in the module docstring).
    """
    if strategy == "hogwild":
        raise ConfigError(
            "hogwild shares one model's memory between local processes that it starts itself, so it cannot "
            "wrap a loop that torchrun started; use `distlearn train --strategy hogwild --workers N` or "
            "distlearn.parallel.hogwild.launch_hogwild"
        )
    if strategy == "ps":
        options.setdefault("optimizer", _server_optimizer(optimizer))
        options.setdefault("lr", float(optimizer.param_groups[0]["lr"]))
    chosen = create_strategy(strategy, **options)
    chosen.place(_check_device(model, optimizer, device))  # before setup: the group's backend follows it
    if grad_scaler is not None and chosen.name not in ("sync", "ddp", "single"):
        raise ConfigError(
            f"grad_scaler= works with strategy 'sync', 'ddp' or 'single', not {chosen.name!r}: a step the "
            "scaler skips on one rank must be skipped on all, which only they guarantee in a user's loop; "
            "use bf16 autocast (no scaler) with this strategy"
        )
    _check_alone(chosen)
    made_group = _join_alone(chosen.backend, chosen.device)
    _register_exit()
    try:
        chosen.setup(seed)
    except BaseException:
        if made_group:
            dist.destroy_process_group()
        raise
    if made_group:
        chosen._owns_group = True  # type: ignore[attr-defined]  # close() leaves the group made here
    elif getattr(chosen, "_owns_group", False):
        # Keep the torchrun job's group past close(): destroying it and joining again in this process (a
        # second parallelize()) makes a new group on the same rendezvous store, where the old group's gloo
        # keys (every rank's address) are still present, so a rank can read a stale address and fail to
        # connect. A later parallelize() reuses it; it is left at exit (_leave_at_exit).
        chosen._owns_group = False
    if not chosen.trains:
        try:
            chosen.serve()
        finally:
            chosen.close()
        raise SystemExit(0)  # a server's whole life is serve(): it never returns to the user's loop
    model, optimizer = chosen.prepare(model, optimizer)
    chosen.use_grad_scaler(grad_scaler)
    step = {"t": 0, "combined": False}

    def combine_gradients() -> None:
        chosen.before_step(model, optimizer, step["t"])
        step["combined"] = True

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if step["combined"]:  # combine_gradients() ran since the last backward
            step["combined"] = False
            return
        if grad_scaler is not None:
            raise ConfigError(
                "with grad_scaler=, call optimizer.combine_gradients() after scaler.scale(loss).backward() "
                "and before scaler.unscale_()/scaler.step(optimizer): the scaler reads the gradients before "
                "optimizer.step() runs"
            )
        chosen.before_step(model, opt, step["t"])

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        chosen.after_step(model, opt, step["t"])
        step["t"] += 1

    def saved(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        strategy_state = {} if _served(chosen) else chosen.state_dict()
        state[STATE_KEY] = {"step": step["t"], "strategy": strategy_state}
        return state

    def loading(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state = dict(state)
        ours = state.pop(STATE_KEY, None)
        if ours is not None:
            if _served(chosen) and int(ours["step"]) > 0:
                what = "the parameter server" if chosen.name == "ps" else "asynchronous EASGD"
                raise ConfigError(
                    f"{what} cannot resume in a user's loop: its state lives on the server "
                    "rank(s), which start afresh and are not in this checkpoint (a worker's next exchange "
                    "would undo what was loaded into it); "
                    + (
                        "resume ps runs with `distlearn train --strategy ps --resume`"
                        if chosen.name == "ps"
                        else "use easgd_mode='sync' (its centre is in the checkpoint) to resume"
                    )
                )
            step["t"] = int(ours["step"])
            if not _served(chosen):
                chosen.load_state_dict(ours["strategy"])
        return state

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    optimizer.register_state_dict_post_hook(saved)
    optimizer.register_load_state_dict_pre_hook(loading)
    optimizer.distlearn_strategy = chosen  # type: ignore[attr-defined]
    optimizer.combine_gradients = combine_gradients  # type: ignore[attr-defined]
    if not hasattr(model, "no_sync"):  # torch's DDP module (strategy "ddp") has its own
        model.no_sync = _no_sync_of(chosen)  # type: ignore[method-assign]
    return model, optimizer


_AT_EXIT = {"registered": False}


def _leave_at_exit() -> None:
    """At interpreter exit, before finalization: drop the communication layer's cached side groups and
    leave the job (also after the user's own ``dist.destroy_process_group()``, which leaves those side
    groups to be torn down during finalization, where gloo's threads abort the process)."""
    from distlearn.comm.groups import release_groups
    from distlearn.launch import shutdown

    release_groups()
    shutdown()
    gc.collect()


def _register_exit() -> None:
    if not _AT_EXIT["registered"]:
        atexit.register(_leave_at_exit)
        _AT_EXIT["registered"] = True


def _server_optimizer(optimizer: torch.optim.Optimizer) -> Any:
    """The servers' optimizer for ps in a user's loop: plain SGD with the user's momentum, if any."""
    group = optimizer.param_groups[0]
    momentum = float(group.get("momentum", 0.0) or 0.0)
    if type(optimizer) is torch.optim.SGD and momentum == 0:
        return "sgd"

    def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        hyper = {
            k: v for k, v in group.items() if k not in ("params", "initial_lr") and k in optimizer.defaults
        }
        return type(optimizer)(params, **hyper)

    return build


def _no_sync_of(strategy: Any) -> Any:
    """``model.no_sync()``: backward inside accumulates locally; the strategies without gradient hooks
    communicate only in ``optimizer.step()``, so for them it is a plain context."""

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        bucketer = getattr(strategy, "bucketer", None)
        if bucketer is None:
            yield
            return
        with bucketer.paused():
            yield

    return no_sync
