"""One process of the EASGD quadratic job (started by tests/parallel/test_easgd.py under torchrun).

Each worker ``i`` minimises ``f_i(x) = 1/2 * ||x - c_i||^2`` (its own optimum ``c_i``) with the easgd strategy
driven through the strategy contract (setup, prepare, before_step, optimizer.step, after_step), and the
first worker saves every worker's trajectory and the centre to OUT/<case>.pt for the test to compare with
the paper's equations.

    python -m torch.distributed.run --nproc-per-node R tests/parallel/easgd_worker.py OUT MODE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from easgd_cases import DIMENSION, LR, STEPS, cases, optimum  # noqa: E402

from distlearn.launch import init_distributed, shutdown  # noqa: E402
from distlearn.parallel.easgd import ElasticAveraging  # noqa: E402
from distlearn.train import create_optimizer  # noqa: E402


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(DIMENSION))


def run_case(mode: str, rho: float, tau: int, optimizer_name: str, options: dict) -> dict | None:
    strategy = ElasticAveraging(mode=mode, rho=rho, tau=tau, timeout_s=60)
    strategy.setup(seed=0)
    if not strategy.trains:
        strategy.serve()
        return None
    model = Point()
    optimizer = create_optimizer(optimizer_name, model.parameters(), lr=LR, **options)
    model, optimizer = strategy.prepare(model, optimizer)
    target = optimum(strategy.replica_index)
    trajectory = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = 0.5 * ((model.x - target) ** 2).sum()
        loss.backward()
        strategy.before_step(model, optimizer, step)
        optimizer.step()
        strategy.after_step(model, optimizer, step)
        trajectory.append(model.x.detach().clone())
    centre = strategy.evaluation_model(model).x.detach().clone() if strategy.is_main else None
    strategy.close()
    return {"trajectory": torch.stack(trajectory), "centre": centre}


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    workers = list(range(1, context.world_size)) if mode == "async" else list(range(context.world_size))
    group = dist.new_group(workers)
    try:
        for label, rho, tau, optimizer_name, options in cases(mode):
            result = run_case(mode, rho, tau, optimizer_name, options)
            if result is None:  # the centre rank
                continue
            gathered = [torch.empty_like(result["trajectory"]) for _ in workers]
            dist.all_gather(gathered, result["trajectory"], group=group)
            if result["centre"] is not None:
                torch.save(
                    {"trajectories": torch.stack(gathered), "centre": result["centre"]}, out / f"{label}.pt"
                )
            dist.barrier(group=group)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
