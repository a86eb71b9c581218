"""A few lines in a user's own training loop, in the manner of DDP and Horovod::

    import distlearn
    model, optimizer = distlearn.parallelize(model, optimizer, strategy="sync", reducer="ring")
    sampler = torch.utils.data.DistributedSampler(dataset)   # this replica's shard (torch's own)
    for x, y in DataLoader(dataset, batch_size=M, sampler=sampler):
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()

Run the script with ``torchrun --nproc-per-node R script.py``. :func:`parallelize` joins the job, checks that
every rank built the same model, broadcasts rank 0's weights and installs the strategy's hooks around
``optimizer.step()`` with torch's own ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``:
before the step the strategy combines gradients (sync: waits for the bucket allreduces started during
backward), after it the strategy combines weights (local SGD, EASGD). The strategy object is attached as
``optimizer.distlearn_strategy`` (its ``stats()`` give bytes sent); call its ``close()`` at the end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distlearn.parallel import create_strategy

__all__ = ["parallelize"]


def parallelize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy: str = "sync",
    *,
    seed: int = 0,
    **options: Any,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Make ``model`` and ``optimizer`` train as one replica of ``strategy`` (see the module docstring).

    ``strategy`` is a name of :data:`distlearn.parallel.STRATEGIES` or an import path ``module:Class``;
    ``options`` are the fields of its options dataclass, under the names of the ``distlearn train`` flags
    (``reducer``, ``bucket_mb``, ``compression``, ``density``, ``average_every``, ``comm_timeout``, ...;
    the older ``timeout_s``, ``period`` are accepted too), or ``options=`` an instance of it.
    """
    chosen = create_strategy(strategy, **options)
    chosen.setup(seed)
    model, optimizer = chosen.prepare(model, optimizer)
    step = {"t": 0}

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        chosen.before_step(model, opt, step["t"])

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        chosen.after_step(model, opt, step["t"])
        step["t"] += 1

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    optimizer.distlearn_strategy = chosen  # type: ignore[attr-defined]
    return model, optimizer
