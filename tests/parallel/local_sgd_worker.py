"""One worker of the local-SGD job (started by tests/parallel/test_local_sgd.py under torchrun).

Trains the small synthetic problem of the sync test through the one trainer loop with plain SGD, once with
the sync strategy and once per local-SGD case, and rank 0 saves each run's final weights (and whether all
ranks ended with identical weights) to OUT/<label>.pt.

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel/local_sgd_worker.py OUT
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_cases import config_for, synthetic_data  # noqa: E402

from distlearn.launch import init_distributed, shutdown  # noqa: E402
from distlearn.parallel.local_sgd import LocalSGD  # noqa: E402
from distlearn.parallel.sync import SyncDataParallel  # noqa: E402
from distlearn.train import train  # noqa: E402

# (label, period k, post-local warm-up W); the run has 12 steps
CASES = [("k1", 1, 0), ("k4", 4, 0), ("k5", 5, 0), ("warmup12-k4", 4, 12), ("warmup4-k4", 4, 4)]


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    train_set, test_set = synthetic_data()
    runs = [("sync", SyncDataParallel(timeout_s=60))]
    runs += [(label, LocalSGD(period=k, warmup_steps=w, timeout_s=60)) for label, k, w in CASES]
    try:
        for label, strategy in runs:
            config = dataclasses.replace(config_for(out / f"run-{label}"), optimizer="sgd", lr=0.1)
            result = train(config, strategy=strategy, train_data=train_set, test_data=test_set)
            flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(context.world_size)]
            dist.all_gather(gathered, flat)
            if context.rank == 0:
                identical = all(torch.equal(other, flat) for other in gathered)
                stats = strategy.stats()
                torch.save({"weights": flat, "identical": identical, **stats}, out / f"{label}.pt")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
