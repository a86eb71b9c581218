"""One process of a parameter-server test job (started by tests/parallel/test_ps.py, one process per rank).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p LOCAL_RANK=0 python ps_worker.py JOB OUT

Each JOB runs several cases in a row on one process group; every case is a real ``train()`` run with the
ps strategy (servers serve, workers train). Workers save their final weights and what the servers told
them to OUT/<case>-rank<r>.pt; servers write OUT/<case>/ps-server<r>.json and -final.pt themselves.
Deterministic schedules use the job's c10d store (a :class:`PushGate`).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ps_cases import STEPS, ps_config  # noqa: E402
from sync_cases import synthetic_data  # noqa: E402

from distlearn.launch import init_distributed, shutdown  # noqa: E402
from distlearn.parallel.ps import ParameterServer  # noqa: E402
from distlearn.train import train  # noqa: E402

TIMEOUT = timedelta(seconds=60)


class StoreGate:
    """Orders pushes through the job's store: ``rules(worker, push)`` lists the keys to wait for."""

    def __init__(self, store: dist.Store, case: str, rules, workers: int) -> None:
        self.store, self.case, self.rules, self.workers = store, case, rules, workers

    def before_push(self, worker: int, push: int) -> None:
        if push == 0:  # everyone has made its initial pull (version 0) before the first push
            self.store.set(f"{self.case}/ready/{worker}", "1")
            self.store.wait([f"{self.case}/ready/{w}" for w in range(self.workers)], TIMEOUT)
        keys = [f"{self.case}/{key}" for key in self.rules(worker, push)]
        if keys:
            self.store.wait(keys, TIMEOUT)

    def after_pull(self, worker: int, push: int) -> None:
        self.store.set(f"{self.case}/pulled/{worker}/{push}", "1")


def round_robin(workers: int):
    """Push t of worker i goes after worker i-1's push t (and worker W-1's push t-1): a fixed turn order."""

    def rules(worker: int, push: int) -> list[str]:
        if worker > 0:
            return [f"pulled/{worker - 1}/{push}"]
        return [f"pulled/{workers - 1}/{push - 1}"] if push > 0 else []

    return rules


def backup_schedule(takers: int, workers: int):
    """Workers 0..R-1 push first; the backup workers push after they have pulled (so they are late)."""

    def rules(worker: int, push: int) -> list[str]:
        if worker >= takers:
            return [f"pulled/{w}/{push}" for w in range(takers)]
        return [f"pulled/{w}/{push - 1}" for w in range(takers, workers)] if push > 0 else []

    return rules


class _KeyGate:
    """A push gate keyed on push ``push``, signalling through the store key ``key`` (hooks do nothing)."""

    def __init__(self, push: int, store: dist.Store, key: str) -> None:
        self.push, self.store, self.key = push, store, key

    def before_push(self, worker: int, push: int) -> None:
        pass

    def after_pull(self, worker: int, push: int) -> None:
        pass


class KillServerAfter(_KeyGate):
    """Worker of ``server-dies``: after its pull ``push`` it tells the server (through ``key``) to die now."""

    def after_pull(self, worker: int, push: int) -> None:
        if push == self.push:
            self.store.set(self.key, "1")


class DiesBeforePush(_KeyGate):
    """Rank 3 of ``worker-dies``: says on the store when its push ``push - 1`` is applied, then dies."""

    def before_push(self, worker: int, push: int) -> None:
        if push == self.push:
            os._exit(3)

    def after_pull(self, worker: int, push: int) -> None:
        if push == self.push - 1:
            self.store.set(self.key, "1")


class WaitBeforePush(_KeyGate):
    """A survivor of ``worker-dies``: its push ``push`` waits for ``key`` (so it is applied last)."""

    def before_push(self, worker: int, push: int) -> None:
        if push == self.push:
            self.store.wait([self.key], TIMEOUT)


def run_case(
    case: str,
    out: Path,
    context,
    store,
    *,
    resume: str | None = None,
    gate=None,
    barrier: bool = True,
    **options,
) -> None:
    only = os.environ.get("PS_CASES")
    if only and case not in only.split(","):
        return
    train_set, test_set = synthetic_data()
    config = ps_config(out / case, optimizer=options.pop("optimizer", "sgd"))
    if "checkpoint_every" in options:
        config.checkpoints, config.checkpoint_every = True, options.pop("checkpoint_every")
        config.keep_checkpoints = 4
    if resume is not None:
        config.resume = resume
    strategy = ParameterServer(
        optimizer=config.optimizer, lr=config.lr, timeout_s=30, out=out / case, resume=resume, gate=gate,
        **options,
    )  # fmt: skip
    result = train(config, strategy=strategy, train_data=train_set, test_data=test_set)
    if strategy.role == "worker":
        flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
        saved = {
            "weights": flat,
            "versions": torch.tensor(strategy._versions),
            "staleness_seen": torch.tensor(strategy.staleness_seen),
            "bytes_sent": strategy.stats().get("bytes_sent", 0),
            "shared_bytes": strategy.transport.shared_bytes if strategy.transport is not None else 0,
            "steps": result.steps,
        }
        torch.save(saved, out / f"{case}-rank{context.rank}.pt")
    # one train() per process in real use; here the next case must not start while a server still serves
    if barrier:
        dist.barrier()


def main() -> int:
    job, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    store = dist.distributed_c10d._get_default_store()
    rank = context.rank
    try:
        if job == "one-server":  # S = 1, W = 3
            run_case("async", out, context, store, gate=StoreGate(store, "async", round_robin(3), 3))
            run_case(
                "aware", out, context, store, staleness_aware=True,
                gate=StoreGate(store, "aware", round_robin(3), 3),
            )  # fmt: skip
            run_case(
                "kstep", out, context, store, local_steps=3, gate=StoreGate(store, "kstep", round_robin(3), 3)
            )
            run_case("softsync", out, context, store, softsync=3, optimizer="momentum")
            run_case(
                "backup", out, context, store, backup_workers=1, optimizer="momentum",
                gate=StoreGate(store, "backup", backup_schedule(2, 3), 3),
            )  # fmt: skip
        elif job == "two-servers":  # S = 2, W = 2
            run_case(
                "async2", out, context, store, servers=2, gate=StoreGate(store, "async2", round_robin(2), 2)
            )
            run_case("softsync2", out, context, store, servers=2, softsync=2, optimizer="momentum",
                     checkpoint_every=6)  # fmt: skip
            # the same run with every payload over the backend instead of the shared-memory blocks
            run_case("softsync2-backend", out, context, store, servers=2, softsync=2, optimizer="momentum",
                     shared_memory=False)  # fmt: skip
            # the workers offer shared blocks, the servers do not map them (as on another machine)
            run_case("softsync2-refused", out, context, store, servers=2, softsync=2, optimizer="momentum",
                     shared_memory=rank >= 2)  # fmt: skip
            run_case(
                "resumed", out, context, store, servers=2, softsync=2, optimizer="momentum",
                resume=str(out / "softsync2" / "checkpoints" / "step-00000006.pt"),
            )  # fmt: skip
            # compressed pushes: lossless top-k (density 1) must equal the dense run; 1-bit sends ~1/32
            run_case("topk-all", out, context, store, servers=2, softsync=2, optimizer="momentum",
                     compression="topk", compression_options={"density": 1.0})  # fmt: skip
            run_case("onebit", out, context, store, servers=2, softsync=2, optimizer="momentum",
                     compression="onebit")  # fmt: skip
        elif job == "worker-dies":  # S = 1, W = 3; worker rank 3 dies before its push 4
            # the survivors' last pushes wait until rank 3's four pushes are applied, so the server's final
            # state is the newest survivor's pull whatever the machine's load (rank 3 may start late)
            key = "dies/rank3-pushed"
            gate = DiesBeforePush(4, store, key) if rank == 3 else WaitBeforePush(STEPS - 1, store, key)
            run_case("dies", out, context, store, worker_timeout_s=5.0, gate=gate, barrier=False)
        elif job == "server-dies":  # S = 1, W = 1; the server dies after the worker's push 3
            if rank == 0:

                def die() -> None:
                    store.wait(["server-dies/now"], TIMEOUT)
                    os._exit(4)

                threading.Thread(target=die, daemon=True).start()
            gate = KillServerAfter(3, store, "server-dies/now") if rank == 1 else None
            try:
                run_case("server-dies", out, context, store, gate=gate, barrier=False)
            except Exception as error:
                (out / f"rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")
                raise
        else:
            raise SystemExit(f"unknown job {job}")
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
