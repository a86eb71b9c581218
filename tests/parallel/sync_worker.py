"""One worker of the sync-equivalence job (started by tests/parallel/test_sync.py under torchrun).

For every reducer and bucketing setting it trains the same small model with the sync strategy through
the one trainer loop, then rank 0 saves the final weights of each run to OUT/<label>.pt and every rank
checks that all ranks ended with identical weights. With ``--ddp-hooks`` the same job then runs
tests/parallel/ddp_hook_worker.py's comparison (DDP with each reducer as its comm hook; OUT/result.txt), so
the test starts one job per world size for both.

    torchrun --nproc-per-node R tests/parallel/sync_worker.py OUT REDUCERS [--ddp-hooks]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_cases import CASES, config_for, synthetic_data  # noqa: E402

from distlearn.launch import init_distributed, shutdown  # noqa: E402
from distlearn.parallel.sync import SyncDataParallel  # noqa: E402
from distlearn.train import train  # noqa: E402


def main() -> int:
    out, reducers = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    train_set, test_set = synthetic_data()
    try:
        for reducer in reducers:
            for label, bucket_mb, overlap in CASES:
                options = {"bucket_mb": bucket_mb, "overlap": overlap, "timeout_s": 60}
                strategy = SyncDataParallel(reducer=reducer, **options)
                config = config_for(out / f"run-{reducer}-{label}")
                result = train(config, strategy=strategy, train_data=train_set, test_data=test_set)
                flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
                gathered = [torch.empty_like(flat) for _ in range(context.world_size)]
                dist.all_gather(gathered, flat)
                for rank, other in enumerate(gathered):
                    if not torch.equal(other, flat):
                        message = f"{reducer}/{label}: rank {rank} differs from rank {context.rank}"
                        raise AssertionError(message)
                if context.rank == 0:
                    saved = {"weights": flat, "bytes_sent": strategy.stats()["bytes_sent"]}
                    torch.save(saved, out / f"{reducer}-{label}.pt")
        if "--ddp-hooks" in sys.argv[3:]:
            from ddp_hook_worker import compare_hooks

            compare_hooks(out, context.rank)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
