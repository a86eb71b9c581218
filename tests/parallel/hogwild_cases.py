"""Process bodies for tests/parallel/test_hogwild.py (module level, so ``spawn`` can import them)."""

from __future__ import annotations

import torch
from torch import nn

from distlearn.parallel.hogwild import Hogwild, HogwildChannel


def visibility(rank: int, channel: HogwildChannel, steps: object, results: object) -> None:
    """Each process builds a differently initialised model, joins the shared weights, and then the two take
    turns: one process takes an SGD step, the other records the weights it now sees."""
    torch.manual_seed(100 + rank)  # different initial weights per process: only sharing makes them equal
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    strategy = Hogwild(rank=rank, world_size=2, channel=channel, timeout_s=30)
    model, optimizer = strategy.prepare(model, optimizer)
    # plain lists: a tensor put on the queue would be shared by a handle that dies with this process
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()  # noqa: E731
    results.put((rank, "after-prepare", flat()))
    for turn in range(4):
        writer = turn % 2
        if rank == writer:
            optimizer.zero_grad()
            model(torch.full((1, 3), float(turn + 1))).sum().backward()
            optimizer.step()
            results.put((rank, f"wrote-{turn}", flat()))
        strategy.barrier()
        if rank != writer:
            results.put((rank, f"read-{turn}", flat()))
        strategy.barrier()
