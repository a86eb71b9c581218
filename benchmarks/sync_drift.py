"""How far one process and synchronous SGD with R = 2 drift apart on the fashion-mnist suite's LeNet.

Question (docs/benchmarks.md, Fashion-MNIST suite): the suite's single process ends at a different accuracy
from DDP and our sync strategy, which agree with each other exactly. Is sync not the same algorithm, or are
the two the same computation whose rounding differences grow?

Method: the suite's work (LeNet, Adam lr 2e-3, global batch 128, seed 0, the same data order) run for 1, 10
and 100 updates by one process and by ``--strategy sync`` with 2 workers (torchrun on 127.0.0.1), once with
the suite's dropout (p = 0.25) and once with dropout off; each run saves its final weights, and the table is
the largest absolute difference of any weight between the two runs (the largest weight is about 0.27).
With dropout, one process draws one mask over 128 examples where two replicas draw one over 64 each, so the
runs differ from the first step; without it, only the summation order of the batch's gradient differs.

    python benchmarks/sync_drift.py                 # about 2 minutes on 2 cores

Writes benchmarks/results/sync_drift.json (command, versions, every difference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distlearn.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def worker(dropout: float, steps: int, strategy: str, out: str) -> None:
    """One run of the suite's work with the given dropout; rank 0 saves the final weights to ``out.pt``."""
    import torch.distributed as dist

    from distlearn.models.lenet import LeNet
    from distlearn.train import TrainConfig, train

    torch.manual_seed(0)  # the initial weights of the model passed in: the same in every process
    config = TrainConfig.build(
        dataset="fashion-mnist",
        model="lenet",
        strategy=strategy,
        optimizer="adam",
        lr=2e-3,
        batch_size=128,
        steps=steps,
        eval_every=steps,
        test_samples=1000,
        out=out,
        overwrite=True,  # a rerun replaces the earlier one
        seed=0,
    )
    result = train(config, model=LeNet(dropout=dropout))
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()}, out + ".pt")


def _run(dropout: float, steps: int, strategy: str, out: str, timeout_s: float) -> dict[str, torch.Tensor]:
    from distlearn.launch import launch_local

    program = [__file__, "--worker", str(dropout), str(steps), strategy, out]
    if strategy == "single":
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, *program], check=True, env=env, timeout=timeout_s)
    else:
        code = launch_local(program, 2, module=False, timeout_s=timeout_s, threads_per_worker=1)
        if code != 0:
            raise SystemExit(f"the sync run (dropout {dropout}, {steps} steps) failed with exit code {code}")
    return torch.load(out + ".pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="1,10,100", help="comma-separated update counts")
    parser.add_argument("--dropouts", default="0.25,0.0")
    parser.add_argument("--timeout", type=float, default=300.0, help="cap per run (seconds)")
    parser.add_argument("--output", default="sync_drift.json", help="file name in benchmarks/results/")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dropout in (float(p) for p in args.dropouts.split(",")):
            for steps in (int(s) for s in args.steps.split(",")):
                one = _run(dropout, steps, "single", f"{tmp}/single-{dropout}-{steps}", args.timeout)
                two = _run(dropout, steps, "sync", f"{tmp}/sync-{dropout}-{steps}", args.timeout)
                diffs = {k: (one[k].float() - two[k].float()).abs().max().item() for k in one}
                worst = max(diffs, key=diffs.get)
                row = {
                    "dropout": dropout,
                    "steps": steps,
                    "max_abs_diff": diffs[worst],
                    "where": worst,
                    "max_abs_weight": max(v.float().abs().max().item() for v in one.values()),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    header = ["dropout", "updates", "max abs. weight difference, 1 process vs sync R = 2", "in"]
    cells = [[f"{r['dropout']:g}", r["steps"], f"{r['max_abs_diff']:.2e}", f"`{r['where']}`"] for r in rows]
    print("\n" + markdown_table(header, cells, align="lrrl"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "sync_drift",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    (RESULTS / args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nraw results benchmarks/results/{args.output}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
