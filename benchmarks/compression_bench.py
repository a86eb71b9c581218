"""Gradient compression on Fashion-MNIST LeNet, R = 2, fixed global batch: every codec in one torchrun job.

Claims (issue 6), measured side by side on this machine (2 cores, gloo over loopback, shared with other jobs):
1. per codec: compression ratio (dense bytes / bytes sent, both counted at the collectives), final test
   accuracy, samples/s, and time to a target accuracy projected with the alpha-beta model at 1, 10 and
   100 Gb/s (step time = measured compute + measured encode/decode + messages * alpha + bytes * beta);
2. goals: 1-bit with error feedback >= 30x losing <= 0.5 points; top-k / DGC at 0.1% density >= 250x losing
   <= 1 point; every codec's encode+decode cheaper than the dense allreduce it replaces at 1 Gb/s;
3. PowerSGD (ours, through the sync strategy and as a DDP comm hook) beside torch's ``powerSGD_hook`` at
   the same rank, start iteration and seed: bytes sent and final accuracy.

Every run trains from the same seed on the same subset and batches (the trainer's fixed global batch B,
each rank M = B / R); one trial each -- the machine is shared, so samples/s are indicative only, and
accuracy differences below ~0.5 points are within seed noise for runs this short.

    python benchmarks/compression_bench.py --group quantisers    # dense, casts, 8-bit, Strom, 1-bit, ...
    python benchmarks/compression_bench.py --group sparsifiers   # dense, top-k, random-k, DGC, PowerSGD x3

Writes benchmarks/results/compression_bench-GROUP.json and docs/img/compression-accuracy-bytes-GROUP.png
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distlearn.comm.compression import COMPRESSORS, BucketContext, Exchange, create_compressor
from distlearn.comm.compression.base import payload_to_bytes
from distlearn.comm.cost_model import link
from distlearn.launch import in_torchrun, init_distributed, launch_local, shutdown
from distlearn.tables import markdown_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PLOT = REPO / "docs" / "img"
GROUPS = {  # each group is one torchrun job (< 15 min here) with its own dense reference
    "quantisers": "dense,fp16,bf16,int8-linear,int8-tree,threshold,onebit,terngrad,qsgd-s4",
    "sparsifiers": "dense,topk-0.1%,randomk-1%,dgc-0.1%,powersgd-r2,powersgd-r2 (our DDP hook),"
    "powersgd-r2 (torch hook)",
    "longer": "dense,onebit,threshold-0.02",  # with --epochs 2: do the error-feedback codecs catch up?
    "lower-lr": "dense,onebit,threshold,randomk-1%",  # with --lr 0.01
    # the goals, 3 seeds: --train-samples 60000 --epochs 2 --schedule cosine --seeds 0,1,2 --eval-every 235
    "goals": "dense,onebit,onebit-m,topk-0.1%,dgc-0.1%,powersgd-r2,powersgd-r2 (torch hook)",
    "cifar": "dense,onebit,topk-0.1%,dgc-0.1%,powersgd-r2,powersgd-r2 (our DDP hook),"
    "powersgd-r2 (torch hook)",
}
DATA = {"fashion-mnist": ("lenet", 1, 28), "cifar10": ("resnet8", 3, 32)}  # model, channels, side
LINKS_GBPS = (1, 10, 100)
START_ITER = 10  # PowerSGD: plain allreduces first (torch requires > 1 with error feedback / warm start)

# (label, codec name or a DDP variant, codec options); DGC and onebit-m carry the momentum themselves
# (optimizer: sgd)
RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("dense", "none", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("int8-linear", "int8-linear", {}),
    ("int8-tree", "int8-tree", {}),
    ("threshold", "threshold", {"threshold": 5e-3}),
    ("threshold-0.02", "threshold", {"threshold": 2e-2}),
    ("onebit", "onebit", {}),
    ("onebit-m", "onebit", {"momentum": 0.9}),  # the momentum correction: the codec is the momentum
    ("terngrad", "terngrad", {}),
    ("qsgd-s4", "qsgd", {"levels": 4}),
    ("topk-0.1%", "topk", {"density": 0.001}),
    ("randomk-1%", "randomk", {"density": 0.01}),
    ("dgc-0.1%", "dgc", {"density": 0.001, "momentum": 0.9, "warmup_steps": 40}),
    ("powersgd-r2", "powersgd", {"rank": 2, "start_iter": START_ITER}),
    ("powersgd-r2 (our DDP hook)", "ddp-ours", {"rank": 2, "start_iter": START_ITER}),
    ("powersgd-r2 (torch hook)", "ddp-torch", {"rank": 2, "start_iter": START_ITER}),
]


class _LocalExchange(Exchange):
    """No communication: times a codec's own arithmetic (PowerSGD's matmuls and QR)."""

    @property
    def world_size(self) -> int:
        return 1


def model_shapes(dataset: str) -> list[tuple[int, ...]]:
    from distlearn.models import create_model

    name, channels, side = DATA[dataset]
    model = create_model(name, in_channels=channels, num_classes=10, image_size=side)
    return [tuple(p.shape) for p in reversed(list(model.parameters()))]  # the bucketer's order


def codec_seconds(
    name: str, options: dict[str, Any], world_size: int, dataset: str = "fashion-mnist", reps: int = 15
) -> float:
    """Median time of one bucket's encode + ``R`` decodes (PowerSGD: its whole compute), model-sized."""
    shapes = model_shapes(dataset)
    numel = sum(math.prod(s) for s in shapes)
    codec = create_compressor(name, **options)
    context = BucketContext("0", shapes, world_size=world_size)
    gradient = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 1e-2
    times = []
    for _ in range(reps + 2):
        flat = gradient.clone()
        start = time.perf_counter()
        if name == "powersgd":
            codec.start_iter = 0
            codec.reduce(flat, context, _LocalExchange())
        else:
            payload = codec.encode(flat, context)
            payload_to_bytes([payload.tensors[n] for n in codec.wire.names], header=not codec.wire.same_size)
            for _ in range(world_size):
                codec.decode(payload, context)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def compute_seconds(local_batch: int, dataset: str = "fashion-mnist", reps: int = 15) -> float:
    """Median time of one forward + backward + SGD step on ``local_batch`` images (no communication)."""
    from distlearn.models import create_model

    torch.manual_seed(0)
    name, channels, side = DATA[dataset]
    model = create_model(name, in_channels=channels, num_classes=10, image_size=side)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(local_batch, channels, side, side), torch.randint(0, 10, (local_batch,))
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


# -- the workers ------------------------------------------------------------------------------------


def ddp_strategy(kind: str, options: dict[str, Any], n_parameters: list[int]) -> Any:
    """torch DDP with our PowerSGD hook or torch's own ``powerSGD_hook``, counting the bytes each sends."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from distlearn.comm.ddp_hooks import compression_ddp_comm_hook
    from distlearn.parallel.ddp import TorchDDP

    class HookedDDP(TorchDDP):
        def prepare(self, model, optimizer):  # type: ignore[no-untyped-def]
            n_parameters.append(sum(p.numel() for p in model.parameters()))
            model, optimizer = super().prepare(model, optimizer)
            if kind == "ddp-ours":
                self.hook = compression_ddp_comm_hook(create_compressor("powersgd", **options))
                model.register_comm_hook(state=None, hook=self.hook)
            else:
                self.state = powerSGD_hook.PowerSGDState(
                    process_group=None,
                    matrix_approximation_rank=options["rank"],
                    start_powerSGD_iter=options["start_iter"],
                    min_compression_rate=2,
                    use_error_feedback=True,
                    warm_start=True,
                    random_seed=0,
                )
                model.register_comm_hook(self.state, powerSGD_hook.powerSGD_hook)
            return model, optimizer

        def evaluation_model(self, model):  # type: ignore[no-untyped-def]
            # only rank 0 evaluates: DDP's forward would broadcast BatchNorm buffers to a rank not there
            return model.module

        def stats(self):  # type: ignore[no-untyped-def]
            if kind == "ddp-ours":
                return {"bytes_sent": self.hook.exchange.bytes_sent}
            # torch counts the elements it allreduces once PowerSGD runs (P, Q and the uncompressed
            # tensors); before start_powerSGD_iter every step allreduces all parameters. A ring allreduce
            # of n bytes sends 2 (R - 1) / R n per rank, as our counters assume.
            dense_steps = min(self._steps, options["start_iter"])
            elements = self.state.total_numel_after_compression + dense_steps * n_parameters[-1]
            ring = 2 * (self.world_size - 1) / self.world_size
            return {"bytes_sent": int(4 * ring * elements)}

    return HookedDDP(timeout_s=300)


def run_dir(label: str, seed: int, seeds: list[int]) -> str:
    """A run's directory under --out: the label in file-name form, with the seed when there are several."""
    name = label.replace(" ", "_").replace("(", "").replace(")", "")
    return name if len(seeds) == 1 else f"{name}-seed{seed}"


def kept_rows(raws: list[str]) -> list[dict[str, Any]]:
    """The rows of these raw files in order, each (label, seed) once (the first file's wins)."""
    rows: list[dict[str, Any]] = []
    for raw in raws:
        seen = {(row["label"], row["seed"]) for row in rows}
        found = json.loads(Path(raw).read_text())["rows"]
        rows += [row for row in found if (row["label"], row["seed"]) not in seen]
    return rows


def worker(args: argparse.Namespace) -> int:
    from distlearn.data import load_dataset
    from distlearn.parallel.sync import SyncDataParallel
    from distlearn.train import TrainConfig, train

    context = init_distributed(timeout_s=300)
    torch.set_num_threads(1)
    root = args.data_root
    train_set, test_set = (
        load_dataset(args.dataset, "train", root=root),
        load_dataset(args.dataset, "test", root=root),
    )
    local_batch = args.batch // context.world_size
    rows = []
    if args.resume:  # keep what a stopped job (and --merge's jobs) measured, run only the rest
        rows = kept_rows([p for p in [args.raw, *args.merge] if Path(p).exists()])
    done = {(row["label"], row["seed"]) for row in rows}
    try:
        for seed, (label, name, options) in (
            (seed, run)
            for seed in args.seeds
            for run in RUNS
            if run[0] in args.only.split(",") and (run[0], seed) not in done
        ):
            n_parameters: list[int] = []
            own_momentum = name == "dgc" or bool(options.get("momentum"))  # the codec corrects the momentum
            if name.startswith("ddp-"):
                strategy: Any = ddp_strategy(name, options, n_parameters)
                strategy_name = "ddp"
            else:
                strategy = SyncDataParallel(
                    compression=name, compression_options=options or None, timeout_s=300
                )
                strategy_name = "sync"
            config = TrainConfig.build(
                dataset=args.dataset,
                model=DATA[args.dataset][0],
                test_samples=args.test_samples,
                optimizer="sgd" if own_momentum else "momentum",
                optimizer_option=() if own_momentum else ("momentum=0.9",),
                lr=args.lr,
                warmup_steps=40,
                schedule=args.schedule,
                seed=seed,
                epochs=args.epochs,
                batch_size=args.batch,
                train_samples=args.train_samples,
                eval_every=args.eval_every,
                strategy=strategy_name,
                out=str(Path(args.out) / run_dir(label, seed, args.seeds)),
                checkpoints=False,
                progress="off",
                tensorboard="off",
                quiet=True,
                threads=1,
            )
            result = train(config, strategy=strategy, train_data=train_set, test_data=test_set)
            reducer = getattr(strategy, "reducer", None)
            rows.append(
                {
                    "label": label,
                    "seed": seed,
                    "codec": name,
                    "options": options,
                    "test_accuracy": result.test_accuracy,
                    "evaluations": [(e.step, e.accuracy) for e in result.evaluations],
                    "steps": result.steps,
                    "bytes_sent": int(strategy.stats()["bytes_sent"]),
                    "messages": int(getattr(reducer, "messages", 0)),
                    "train_seconds": result.train_seconds,
                    "job_samples_per_s": result.summary["job_samples_per_s"],
                }
            )
            if context.rank == 0:  # saved after every run, so a stopped job keeps what it measured
                print(f"[compression_bench] {label} seed {seed}: {rows[-1]['test_accuracy']:.4f}", flush=True)
                Path(args.raw).write_text(json.dumps({"rows": rows, "timings": {}}, indent=1))
        timings = {"compute_s": compute_seconds(local_batch, args.dataset)}
        for label, name, options in RUNS:
            if name in COMPRESSORS and (not args.only or label in args.only.split(",")):
                timings[label] = codec_seconds(name, options, context.world_size, args.dataset)
    finally:
        shutdown()
    if context.rank == 0:
        Path(args.raw).write_text(json.dumps({"rows": rows, "timings": timings}, indent=1))
    return 0


# -- the report -------------------------------------------------------------------------------------


def report(args: argparse.Namespace, raw: dict[str, Any], seconds: float) -> dict[str, Any]:
    fit = json.loads((REPO / "benchmarks" / "results" / "cost_model_fit.json").read_text())
    alpha = fit["p2p_alpha_s"]
    timings = raw["timings"]
    only = args.only.split(",")  # a resumed raw file may hold other codecs and seeds: report these
    rows = [r for r in raw["rows"] if r["label"] in only and r.get("seed", 0) in args.seeds]
    dense = {r.get("seed", 0): r for r in rows if r["codec"] == "none"}  # each seed's own dense reference
    first = dense[min(dense)]
    world = 2
    parameters = sum(math.prod(s) for s in model_shapes(args.dataset))
    dense_step_bytes = first["bytes_sent"] / first["steps"]
    target = math.floor((statistics.fmean(r["test_accuracy"] for r in dense.values()) - 0.02) * 100) / 100
    for row in rows:
        reference = dense[row.get("seed", 0)]
        row["ratio"] = reference["bytes_sent"] / row["bytes_sent"] if row["bytes_sent"] else math.inf
        row["accuracy_lost_points"] = 100 * (reference["test_accuracy"] - row["test_accuracy"])
        row["codec_s"] = timings.get(row["label"], 0.0)
        steps_to_target = next((s for s, a in row["evaluations"] if a >= target), None)
        row["steps_to_target"] = steps_to_target
        per_step_bytes = row["bytes_sent"] / row["steps"]
        if row["codec"] == "none":
            messages = 2 * (world - 1)  # one bucket, gloo's ring allreduce
        elif row["codec"] == "ddp-torch":
            messages = 3 * 2 * (world - 1)  # uncompressed tensors, P, Q
        elif row["codec"] == "ddp-ours":
            messages = 2 * 2 * (world - 1)
        else:
            messages = row["messages"] / row["steps"]
        row["projected_step_s"] = {}
        row["projected_time_to_target_s"] = {}
        for gbps in LINKS_GBPS:
            net = link(gbps, alpha=alpha)
            step = timings["compute_s"] + row["codec_s"] + messages * net.alpha + per_step_bytes * net.beta
            row["projected_step_s"][gbps] = step
            row["projected_time_to_target_s"][gbps] = steps_to_target * step if steps_to_target else None
    summary = summarise(rows)
    one_gbps = link(1, alpha=alpha)
    dense_allreduce_1g = 2 * (world - 1) * one_gbps.alpha + dense_step_bytes * one_gbps.beta
    by_label = {r["label"]: r for r in summary}
    goals = {
        "onebit >= 30x and <= 0.5 points lost": _goal(by_label.get("onebit"), 30, 0.5),
        "onebit-m >= 30x and <= 0.5 points lost": _goal(by_label.get("onebit-m"), 30, 0.5),
        "topk 0.1% >= 250x and <= 1 point lost": _goal(by_label.get("topk-0.1%"), 250, 1.0),
        "dgc 0.1% >= 250x and <= 1 point lost": _goal(by_label.get("dgc-0.1%"), 250, 1.0),
        "every codec's encode+decode < dense allreduce at 1 Gb/s": {
            "dense_allreduce_1gbps_s": dense_allreduce_1g,
            "slower": [r["label"] for r in rows if r["codec_s"] >= dense_allreduce_1g and r["codec_s"] > 0],
        },
    }
    goals["every codec's encode+decode < dense allreduce at 1 Gb/s"]["met"] = not goals[
        "every codec's encode+decode < dense allreduce at 1 Gb/s"
    ]["slower"]
    dgc = next((r for r in rows if r["label"] == "dgc-0.1%"), None)
    if dgc:  # bytes after the density warm-up, from the per-step counters in metrics.jsonl
        goals["dgc 0.1% >= 250x and <= 1 point lost"]["ratio_after_warmup"] = _ratio_after(
            args, dgc, dense_step_bytes, dgc["options"]["warmup_steps"]
        )
    return {
        "benchmark": "compression_bench",
        "command": "python benchmarks/compression_bench.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "load": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("raw",)},
        "parameters": parameters,
        "alpha_s": alpha,
        "alpha_source": "benchmarks/results/cost_model_fit.json p2p_alpha_s (loopback ping-pong)",
        "target_accuracy": target,
        "compute_s_per_step": timings["compute_s"],
        "wall_seconds": seconds,  # of this invocation only when --resume ran part of the job before
        "resumed": bool(args.resume),
        "rows": rows,
        "summary": summary,
        "goals": goals,
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per run label over its seeds: means, the spread of the final accuracy and of the points lost
    (each seed against its own dense run), and the projected time to target when every seed reached it."""
    summary = []
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label]
        accuracy = [100 * r["test_accuracy"] for r in runs]
        lost = [r["accuracy_lost_points"] for r in runs]
        reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        summary.append(
            {
                "label": label,
                "seeds": [r.get("seed", 0) for r in runs],
                "ratio": statistics.fmean(r["ratio"] for r in runs),
                "bytes_sent": statistics.fmean(r["bytes_sent"] for r in runs),
                "accuracy_mean": statistics.fmean(accuracy),
                "accuracy_std": statistics.stdev(accuracy) if len(runs) > 1 else 0.0,
                "accuracy_lost_points": statistics.fmean(lost),
                "lost_std": statistics.stdev(lost) if len(runs) > 1 else 0.0,
                "samples_per_s": statistics.fmean(r["job_samples_per_s"] for r in runs),
                "codec_s": runs[0]["codec_s"],
                "reached": len(reached),
                "steps_to_target": statistics.fmean(reached) if len(reached) == len(runs) else None,
                "projected_time_to_target_s": {
                    gbps: (
                        statistics.fmean(r["projected_time_to_target_s"][gbps] for r in runs)
                        if len(reached) == len(runs)
                        else None
                    )
                    for gbps in LINKS_GBPS
                },  # fmt: skip
            }
        )
    return summary


def _goal(row: dict[str, Any] | None, ratio: float, points: float) -> dict[str, Any]:
    if row is None:
        return {"met": None}
    return {
        "ratio": row["ratio"],
        "points_lost": row["accuracy_lost_points"],
        "met": row["ratio"] >= ratio and row["accuracy_lost_points"] <= points,
    }


def _ratio_after(args: argparse.Namespace, row: dict[str, Any], dense_step_bytes: float, after: int) -> float:
    path = Path(args.out) / run_dir(row["label"], row.get("seed", 0), args.seeds) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    points = [(r["step"], r["bytes_sent"]) for r in records if r.get("bytes_sent") is not None]
    start = next((p for p in points if p[0] >= after), None)
    end = points[-1]
    if start is None or end[0] == start[0]:
        return math.nan
    return dense_step_bytes / ((end[1] - start[1]) / (end[0] - start[0]))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"target accuracy {result['target_accuracy']:.2f} (dense final - 2 points, mean over seeds); "
        f"compute {1e3 * result['compute_s_per_step']:.1f} ms/step; alpha {1e6 * result['alpha_s']:.0f} us",
        "",
    ]
    header = ["codec", "ratio", "final acc.", "lost (pts)", "samples/s", "codec ms", "steps to target",
              "time to target 1 / 10 / 100 Gb/s (s)"]  # fmt: skip
    cells = []
    several = any(len(r["seeds"]) > 1 for r in result["summary"])
    for r in result["summary"]:
        times = " / ".join(
            f"{t:.2f}" if t is not None else "--" for t in r["projected_time_to_target_s"].values()
        )
        accuracy, lost = f"{r['accuracy_mean']:.2f}", f"{r['accuracy_lost_points']:+.2f}"
        if several:
            accuracy += f" ± {r['accuracy_std']:.2f}"
            lost += f" ± {r['lost_std']:.2f}"
        steps = f"{r['steps_to_target']:.0f}" if r["steps_to_target"] is not None else "not reached"
        if several and r["reached"] < len(r["seeds"]):
            steps = f"{r['reached']} of {len(r['seeds'])} reached"
        cells.append(
            [r["label"], f"{r['ratio']:.1f}x", accuracy, lost, f"{r['samples_per_s']:.0f}",
             f"{1e3 * r['codec_s']:.2f}", steps, times]
        )  # fmt: skip
    lines.append(markdown_table(header, cells, align="lrrrrrrl"))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in result["summary"]:  # mean over the seeds, the bar one standard deviation
        megabytes = r["bytes_sent"] / 1e6
        ax.errorbar(megabytes, r["accuracy_mean"], yerr=r["accuracy_std"], fmt="o", ms=5, capsize=3)
        ax.annotate(r["label"], (megabytes, r["accuracy_mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per rank over the whole run (log)")
    settings = result["settings"]
    seeds = len(settings["seeds"])
    ax.set_ylabel("final test accuracy (%)" + (f", mean of {seeds} seeds" if seeds > 1 else ""))
    ax.set_title(
        f"{settings['dataset']} {DATA[settings['dataset']][0]}, R = 2, fixed global batch "
        f"({settings['group']})"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group", choices=sorted(GROUPS), default="quantisers")
    parser.add_argument("--train-samples", type=int, default=16000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128, help="global batch B (M = B / 2 per rank)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="learning-rate schedule after the 40-step warm-up")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each codec runs once per seed")
    parser.add_argument("--dataset", choices=sorted(DATA), default=None, help="default: by --group")
    parser.add_argument("--data-root", default=None, help="e.g. /work/shared/data/cifar10")
    parser.add_argument("--test-samples", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--only", default="", help="comma-separated run labels (default: the group's)")
    parser.add_argument("--out", default=None, help="run directories (default runs/compression_bench/GROUP)")
    parser.add_argument("--raw", default=None, help="rank 0's raw results (default OUT/raw.json)")
    parser.add_argument(
        "--timeout", type=float, default=1500, help="seconds for the whole job, every run of it together"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --raw (a stopped job's) and run only the missing (codec, seed) pairs",
    )
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        help="with --resume: also keep the runs in this raw file (e.g. other seeds run as a job alongside)",
    )
    parser.add_argument(
        "--tag", default="", help="results file compression_bench-GROUP-TAG.json (keeps old ones)"
    )
    args = parser.parse_args()
    args.only = args.only or GROUPS[args.group]
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.dataset = args.dataset or ("cifar10" if args.group == "cifar" else "fashion-mnist")
    args.out = args.out or f"runs/compression_bench/{args.group}"
    args.raw = args.raw or f"{args.out}/raw.json"
    if args.merge and not args.resume:
        parser.error("--merge keeps another job's runs and needs --resume")
    if in_torchrun():
        return worker(args)
    Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    code = launch_local(
        [__file__, *sys.argv[1:]], 2, module=False, timeout_s=args.timeout, threads_per_worker=1
    )
    if code != 0:
        print(f"compression_bench: the job failed (exit {code})", file=sys.stderr)
        return code
    result = report(args, json.loads(Path(args.raw).read_text()), time.monotonic() - started)
    name = args.group + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"compression_bench-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, PLOT / f"compression-accuracy-bytes-{name}.png")
    print(markdown(result))
    print(json.dumps(result["goals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
