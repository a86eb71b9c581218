"""What the single-process trainer reaches on the three datasets, and how long an epoch takes here.

Claims (issue 4): LeNet on Fashion-MNIST reaches >= 91% test accuracy; the MLP on the MNIST split and the
ResNet on CIFAR-10 learn as expected. Each run is ``distlearn.train.train`` with the settings below (the
same as ``distlearn train`` flags); results, with accuracy and seconds per epoch, go to
benchmarks/results/train_accuracy.json and docs/training.md.

    python benchmarks/train_accuracy.py [--only lenet-fashion-mnist,mlp-mnist,resnet8-cifar10] [--seeds 0 1 2]

``--seeds`` runs each configuration once per seed (``TrainConfig.seed``, default 0 alone); every row keeps
its seed (with several seeds its run directory is ``runs/bench-NAME-seedS``), and ``summary`` holds, per
run, the mean and sample standard deviation of the test accuracy over the seeds. ``--threads N`` sets
torch's intra-op threads (on a loaded machine 2 threads per process collapse).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from distlearn.train import TrainConfig, train

RUNS = {
    "lenet-fashion-mnist": TrainConfig.build(
        dataset="fashion-mnist", model="lenet", optimizer="adam", lr=2e-3, epochs=8, batch_size=128,
        schedule="cosine", warmup_steps=100,
    ),
    "mlp-mnist": TrainConfig.build(
        dataset="mnist", model="mlp", optimizer="adam", lr=1e-3, epochs=15, batch_size=128, schedule="cosine",
    ),
    "resnet8-cifar10": TrainConfig.build(
        dataset="cifar10", model="resnet8", optimizer="nesterov", lr=0.05, epochs=4, batch_size=128,
        optimizer_option=("momentum=0.9", "weight_decay=5e-4"), schedule="cosine", warmup_steps=200,
    ),
}  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Per run name: its seeds and the mean and sample standard deviation (0 for one seed) of the test
    accuracy and of the seconds per epoch (measured under whatever load the machine had)."""
    out = []
    for name in dict.fromkeys(row["run"] for row in rows):
        mine = [row for row in rows if row["run"] == name]
        accuracy = [row["test_accuracy"] for row in mine]
        epoch = [sum(row["seconds_per_epoch"]) / max(1, len(row["seconds_per_epoch"])) for row in mine]
        spread = statistics.stdev(accuracy) if len(mine) > 1 else 0.0
        out.append({
            "run": name,
            "seeds": [row["seed"] for row in mine],
            "test_accuracy": [statistics.fmean(accuracy), spread],
            "seconds_per_epoch": [statistics.fmean(epoch), statistics.stdev(epoch) if len(mine) > 1 else 0.0],
        })  # fmt: skip
    return out


def write(out: str, rows: list[dict]) -> None:
    """The result file: the command, the machine, every finished run and the summary over its seeds."""
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "versions": {"torch": str(torch.__version__)},
        "rows": rows,
        "summary": summarise(rows),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--data-root", default=os.environ.get("DISTLEARN_DATA", "../shared/data"))
    parser.add_argument("--out", default="benchmarks/results/train_accuracy.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    rows = []
    for name, seed in [(name, seed) for name in args.only.split(",") for seed in args.seeds]:
        base = RUNS[name]
        root = None if base.dataset == "fashion-mnist" else args.data_root
        quiet = {"progress": "off", "tensorboard": "off", "checkpoints": False, "quiet": True}
        out = f"runs/bench-{name}" + (f"-seed{seed}" if len(args.seeds) > 1 else "")  # one directory per run
        config = replace(base, data_root=root, out=out, seed=seed, threads=args.threads, **quiet)
        result = train(config)
        row = {
            "run": name,
            "seed": seed,
            "test_accuracy": result.test_accuracy,
            "best_accuracy": result.best_accuracy,
            "epochs": result.epochs,
            "seconds_per_epoch": result.seconds_per_epoch,
            "samples_per_s": result.samples_per_s,
            "threads": config.threads or torch.get_num_threads(),  # the run's, not torch's after it
            "note": result.summary.get("dataset_note"),
            "config": {k: v for k, v in asdict(config).items() if v is not None},
        }
        rows.append(row)
        epoch = sum(result.seconds_per_epoch) / max(1, len(result.seconds_per_epoch))
        print(f"{name} seed {seed} test accuracy {100 * result.test_accuracy:6.2f}%  {epoch:6.1f} s/epoch  "
              f"{result.samples_per_s:7.0f} samples/s", flush=True)  # fmt: skip
        write(args.out, rows)  # after every run, so a stopped job keeps the seeds it finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
