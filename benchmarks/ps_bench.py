"""Parameter servers: accuracy vs wall time and vs updates per variant, and pushes/s against a Ray actor.

Claims (issue 7), measured in one run on this machine:

1. Fashion-MNIST (the real training set, a seeded subset), MLP, fixed global batch ``B``, one epoch:
   test accuracy against wall time and against server updates for ``sync`` (our synchronous strategy),
   ``ps`` (Downpour async), ``ps`` staleness-aware, ``ps`` 2-softsync, ``ps`` with one backup worker, and
   ``ps`` with k = 4 local steps. One server, R = 3 workers (backup: R = 2 + b = 1), ``B = 60``, plain
   SGD at lr 0.1 on every side (server momentum with asynchrony diverged at lr 0.05: asynchrony already
   acts like momentum, Mitliagkas et al. 2016).
2. Pushes per second of our server (c10d point-to-point, one server + one worker process) against a
   parameter server written as a Ray actor (``push(g) -> w`` applying SGD to a numpy array), on the same
   tensor sizes, same update rule, the same synchronous push-then-pull loop; warm-up, then ``--trials``
   timed rounds of ``--pushes`` pushes, median and spread. Ray is an optional bench-only dependency.
3. ``--part codecs``: compressed pushes (docs/ps.md) -- ``distlearn train --strategy ps --workers 3 --servers
   1`` (1 server + 2 workers), MLP, 12,000 Fashion-MNIST training images, 2 epochs, batch 64, SGD lr 0.05 on
   the server, once per codec of ``CODECS`` and seed: the main worker's final test accuracy and the bytes
   worker rank 1 sent (its metrics summary).

    python benchmarks/ps_bench.py [--part all|accuracy|pushes|codecs] [--train-samples 12000] [--trials 3]

``--seeds 0 1 2`` runs every accuracy variant (or codec) once per seed (``TrainConfig.seed``: weights, data
order) and keeps every run with its seed; each variant's ``summary`` holds the mean and sample standard
deviation over the seeds, and ``--table FILE.md`` writes them as the Markdown table docs/ps.md copies.
``--out`` names the result file (default below; a file that exists is updated part by part, the other
parts kept).

Writes benchmarks/results/ps_bench.json and docs/img/ps-accuracy.png, docs/img/ps-pushes.png. On this
2-core machine several processes share the cores (and other jobs ran at the same time): the accuracy
curves show the algorithms' behaviour, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ps_bench.json"
IMG = ROOT / "docs" / "img"

# name -> (strategy, processes, options)
VARIANTS: dict[str, tuple[str, int, dict]] = {
    "sync": ("sync", 3, {}),
    "ps": ("ps", 4, {}),
    "ps staleness-aware": ("ps", 4, {"staleness_aware": True}),
    "ps 2-softsync": ("ps", 4, {"softsync": 2}),
    "ps backup b=1": ("ps", 4, {"backup_workers": 1}),
    "ps k=4 local steps": ("ps", 4, {"local_steps": 4}),
}
GLOBAL_BATCH = 60
LR = 0.1
# codec -> extra flags, for --part codecs (the loop of docs/ps.md)
CODECS: dict[str, list[str]] = {
    "none": [],
    "fp16": [],
    "int8-linear": [],
    "onebit": [],
    "terngrad": [],
    "topk": ["--density", "0.01"],
}


# -- children (run under torchrun) ---------------------------------------------------------------------------


def child_train(spec: dict) -> None:
    from distlearn.data import load_dataset
    from distlearn.parallel.ps import ParameterServer
    from distlearn.parallel.sync import SyncDataParallel
    from distlearn.train import TrainConfig, train

    out = Path(spec["out"])
    steps_per_eval = spec["eval_every"]
    config = TrainConfig.build(
        dataset="fashion-mnist", model="mlp", optimizer="sgd", lr=LR, batch_size=GLOBAL_BATCH, epochs=1,
        train_samples=spec["train_samples"], test_samples=2000, eval_every=steps_per_eval, log_every=10**6,
        checkpoints=False, progress="off", tensorboard="off", quiet=True, threads=1, out=str(out),
        seed=spec.get("seed", 0),
    )  # fmt: skip
    train_set, test_set = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    versions: dict[int, int] = {}

    if spec["strategy"] == "sync":
        strategy = SyncDataParallel(timeout_s=120)
    else:

        class Recording(ParameterServer):
            def after_step(self, model, optimizer, step):  # noqa: ANN001
                super().after_step(model, optimizer, step)
                versions[step + 1] = self._versions[0] if self._versions else 0

        strategy = Recording(optimizer="sgd", lr=LR, timeout_s=120, worker_timeout_s=60, out=out,
                             **spec["options"])  # fmt: skip
    result = train(config, strategy=strategy, train_data=train_set, test_data=test_set)
    if strategy.is_main:
        evals = [
            {
                "step": r.step,
                "wall_time": r.wall_time,
                "accuracy": r.accuracy,
                "updates": r.step if spec["strategy"] == "sync" else versions.get(r.step, 0),
            }
            for r in result.evaluations
        ]
        record = {"evals": evals, "train_seconds": result.train_seconds, "steps": result.steps}
        (out / "bench.json").write_text(json.dumps(record))


def child_pushes(spec: dict) -> None:
    """One server + one worker: time synchronous push/pull round trips of our strategy."""
    from distlearn.parallel.ps import ParameterServer

    strategy = ParameterServer(optimizer="sgd", lr=0.01, timeout_s=120, worker_timeout_s=60)
    strategy.setup(0)
    try:
        if not strategy.trains:
            strategy.serve()
            return
        timings: dict[str, list[float]] = {}
        for size in spec["sizes"]:
            model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(size))])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            strategy.prepare(model, optimizer)
            gradient = torch.randn(size, generator=torch.Generator().manual_seed(0))
            step = 0

            def rounds(
                n: int,
                model: torch.nn.ParameterList = model,
                gradient: torch.Tensor = gradient,
                optimizer: torch.optim.Optimizer = optimizer,
            ) -> float:
                nonlocal step
                started = time.perf_counter()
                for _ in range(n):
                    model[0].grad = gradient
                    strategy.before_step(model, optimizer, step)
                    step += 1
                return n / (time.perf_counter() - started)

            rounds(spec["warmup"])
            timings[str(size)] = [rounds(spec["pushes"]) for _ in range(spec["trials"])]
        Path(spec["out"]).write_text(json.dumps(timings))
    finally:
        strategy.close()


# -- the parent -------------------------------------------------------------------------------------------


def run_child(kind: str, spec: dict, nproc: int, timeout: float = 300) -> None:
    from distlearn.launch import launch_local

    code = launch_local(
        [__file__, f"--child-{kind}", json.dumps(spec)], nproc, module=False, timeout_s=timeout
    )
    if code != 0:
        raise SystemExit(f"the {kind} job {spec} failed with exit code {code}")


def accuracy_part(args: argparse.Namespace, scratch: Path, seed: int | None = None) -> dict:
    results = {}
    for name, (strategy, nproc, options) in VARIANTS.items():
        out = scratch / (name.replace(" ", "_") + ("" if seed is None else f"-seed{seed}"))
        every = max(1, args.train_samples // GLOBAL_BATCH // 5)
        spec = {"strategy": strategy, "options": options, "out": str(out),
                "train_samples": args.train_samples, "eval_every": every}  # fmt: skip
        if seed is not None:
            spec["seed"] = seed
        started = time.perf_counter()
        run_child("train", spec, nproc)
        record = json.loads((out / "bench.json").read_text())
        record["job_seconds"] = time.perf_counter() - started
        server = out / "ps-server0.json"
        if server.is_file():
            served = json.loads(server.read_text())
            keep = ("version", "pushes", "applied", "dropped", "mean_staleness", "max_staleness")
            record["server"] = {key: served[key] for key in keep}
        if seed is not None:
            record = {"seed": seed, **record}
        results[name] = record
        final = record["evals"][-1]
        tag = "" if seed is None else f"seed {seed} "
        print(f"{name:22s} {tag}acc {final['accuracy']:.4f}  updates {final['updates']:5d}  "
              f"train {record['train_seconds']:.1f} s  server {record.get('server', {})}",
              flush=True)  # fmt: skip
    return results


def mean_std(values: list[float]) -> list[float]:
    """[mean, sample standard deviation] (0 for one value)."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def seeded_accuracy_part(args: argparse.Namespace, scratch: Path) -> dict:
    """Every variant once per seed (all variants of one seed, then the next seed): per variant its runs and
    the mean ± std of the final accuracy, the server updates at the main worker's last pull, its training
    seconds and the server's staleness and drops."""
    by_seed = [accuracy_part(args, scratch, seed) for seed in args.seeds]
    results = {}
    for name in VARIANTS:
        runs = [done[name] for done in by_seed]
        results[name] = {"summary": summarise(runs), "runs": runs}
    return results


def summarise(runs: list[dict]) -> dict:
    """One variant's runs (one per seed): mean ± std of the final accuracy, the updates at the last
    evaluation, the training seconds and, where a server reported them, its staleness and drops."""
    summary = {
        "seeds": [r["seed"] for r in runs],
        "final_accuracy": mean_std([r["evals"][-1]["accuracy"] for r in runs]),
        "updates": mean_std([r["evals"][-1]["updates"] for r in runs]),
        "train_seconds": mean_std([r["train_seconds"] for r in runs]),
    }
    if all("server" in r for r in runs):
        for key in ("mean_staleness", "max_staleness", "dropped"):
            summary[key] = mean_std([r["server"][key] for r in runs])
    return summary


def seeded_table(accuracy: dict) -> str:
    """The Markdown table of a ``--seeds`` accuracy part (mean ± std over the seeds)."""
    seeds = len(next(iter(accuracy.values()))["summary"]["seeds"])
    lines = [
        f"| variant | final test accuracy (%, n = {seeds}) | server updates (main worker's last pull) "
        "| train seconds (main worker, loaded) | mean / max staleness | dropped |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, variant in accuracy.items():
        s = variant["summary"]
        acc, updates, seconds = s["final_accuracy"], s["updates"], s["train_seconds"]
        if "mean_staleness" in s:
            stale = "{:.2f} ± {:.2f} / {:.0f} ± {:.0f}".format(*s["mean_staleness"], *s["max_staleness"])
            dropped = "{:.0f} ± {:.0f}".format(*s["dropped"])
        else:
            stale = dropped = "–"
        lines.append(
            f"| {name} | {100 * acc[0]:.2f} ± {100 * acc[1]:.2f} | {updates[0]:.0f} ± {updates[1]:.0f} "
            f"| {seconds[0]:.1f} ± {seconds[1]:.1f} | {stale} | {dropped} |"
        )
    return "\n".join(lines) + "\n"


def codec_command(codec: str, seed: int, out: Path, train_samples: int) -> list[str]:
    return [
        sys.executable, "-m", "distlearn", "train", "--strategy", "ps", "--workers", "3", "--servers", "1",
        "--dataset", "fashion-mnist", "--model", "mlp", "--train-samples", str(train_samples),
        "--test-samples", "2000", "--epochs", "2", "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05",
        "--compression", codec, *CODECS[codec], "--seed", str(seed), "--out", str(out), "--no-checkpoints",
        "--progress", "off", "--tensorboard", "off", "--quiet",
    ]  # fmt: skip


def codecs_part(args: argparse.Namespace, scratch: Path) -> dict:
    """Every codec once per seed (all codecs of one seed, then the next): the main worker's final test
    accuracy and worker rank 1's bytes sent, per run and as mean ± std per codec."""
    runs: dict[str, list[dict]] = {codec: [] for codec in CODECS}
    for seed in args.seeds or [0]:
        for codec in CODECS:
            out = scratch / f"codec-{codec}-seed{seed}"
            line = codec_command(codec, seed, out, args.train_samples)
            done = subprocess.run(line, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                raise SystemExit(f"{codec} seed {seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            summary = next(
                json.loads(text)
                for text in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(text)["kind"] == "summary"
            )
            run = {
                "seed": seed,
                "command": "distlearn " + " ".join(line[3:]).replace(str(out), "OUT"),
                "accuracy": summary["accuracy"],
                "bytes_sent": summary["bytes_sent"],
                "train_seconds": summary["extra"]["train_seconds"],
                "staleness_mean": summary["extra"].get("staleness_mean"),
            }
            runs[codec].append(run)
            megabytes = run["bytes_sent"] / 1e6
            print(f"{codec:12s} seed {seed}: acc {run['accuracy']:.4f}, {megabytes:.1f} MB sent", flush=True)
    dense = statistics.fmean(r["bytes_sent"] for r in runs["none"])
    result = {}
    for codec, mine in runs.items():
        sent = statistics.fmean(r["bytes_sent"] for r in mine)
        result[codec] = {
            "summary": {
                "seeds": [r["seed"] for r in mine],
                "accuracy": mean_std([r["accuracy"] for r in mine]),
                "bytes_sent": mean_std([r["bytes_sent"] for r in mine]),
                "dense_over_sent": dense / sent,
            },
            "runs": mine,
        }
    return result


def codecs_table(codecs: dict) -> str:
    """The Markdown table of ``--part codecs`` (mean ± std over the seeds)."""
    seeds = len(next(iter(codecs.values()))["summary"]["seeds"])
    lines = [
        f"| codec | test accuracy (%, n = {seeds}) | bytes sent by worker rank 1 (MB) | dense / sent |",
        "|---|---:|---:|---:|",
    ]
    for codec, row in codecs.items():
        s = row["summary"]
        accuracy, sent = s["accuracy"], s["bytes_sent"]
        lines.append(
            f"| {codec} | {100 * accuracy[0]:.2f} ± {100 * accuracy[1]:.2f} | {sent[0] / 1e6:.1f} "
            f"| {s['dense_over_sent']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def ray_pushes(sizes: list[int], warmup: int, pushes: int, trials: int) -> dict[str, list[float]]:
    import numpy as np
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:

        @ray.remote
        class RayParameterServer:
            def __init__(self, size: int, lr: float) -> None:
                self.w = np.zeros(size, dtype=np.float32)
                self.lr = np.float32(lr)
                self.version = 0

            def push(self, gradient: np.ndarray) -> np.ndarray:
                self.w -= self.lr * gradient
                self.version += 1
                return self.w

        timings = {}
        for size in sizes:
            server = RayParameterServer.remote(size, 0.01)
            gradient = torch.randn(size, generator=torch.Generator().manual_seed(0)).numpy()
            local = np.zeros(size, dtype=np.float32)

            def rounds(n: int, server=server, gradient=gradient, local=local) -> float:  # noqa: ANN001
                started = time.perf_counter()
                for _ in range(n):
                    np.copyto(local, ray.get(server.push.remote(gradient)))
                return n / (time.perf_counter() - started)

            rounds(warmup)
            timings[str(size)] = [rounds(pushes) for _ in range(trials)]
            ray.kill(server)
        return timings
    finally:
        ray.shutdown()


def pushes_part(args: argparse.Namespace, scratch: Path) -> dict:
    sizes = [1_000, 100_000, 1_000_000]
    ours: dict[str, list[float]] = {}
    for size in sizes:  # one job per size: a server's layout is fixed by its first worker
        out = scratch / f"pushes-{size}.json"
        spec = {"sizes": [size], "warmup": 20, "pushes": args.pushes, "trials": args.trials, "out": str(out)}
        run_child("pushes", spec, 2)
        ours.update(json.loads(out.read_text()))
    try:
        ray_version = __import__("ray").__version__
        theirs = ray_pushes(sizes, 20, args.pushes, args.trials)
    except ImportError:
        ray_version, theirs = None, {}
        print("Ray is not installed (pip install ray): only our server was measured", flush=True)
    table = {}
    for size in sizes:
        row = {"ours": ours[str(size)], "ours_median": statistics.median(ours[str(size)])}
        if theirs:
            row.update(ray=theirs[str(size)], ray_median=statistics.median(theirs[str(size)]))
            row["ratio"] = row["ours_median"] / row["ray_median"]
        table[str(size)] = row
        spread = f"[{min(ours[str(size)]):.0f}, {max(ours[str(size)]):.0f}]"
        line = f"{size:>9,d} floats: ours {row['ours_median']:8.0f} pushes/s {spread}"
        if theirs:
            line += f"   ray {row['ray_median']:8.0f} pushes/s   ratio {row['ratio']:.2f}x"
        print(line, flush=True)
    return {"sizes": table, "ray_version": ray_version}


def plot(record: dict, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    if "accuracy" in record:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for index, (name, result) in enumerate(record["accuracy"].items()):
            for number, run in enumerate(result.get("runs", [result])):  # every seed's curve, one colour
                evals, label, color = run["evals"], name if number == 0 else None, f"C{index}"
                left.plot([e["wall_time"] for e in evals], [e["accuracy"] for e in evals], marker="o",
                          color=color, label=label)  # fmt: skip
                right.plot([e["updates"] for e in evals], [e["accuracy"] for e in evals], marker="o",
                           color=color, label=label)  # fmt: skip
        left.set(xlabel="wall time (s)", ylabel="test accuracy", title="accuracy vs wall time")
        right.set(xlabel="server updates", ylabel="test accuracy", title="accuracy vs updates")
        left.legend(fontsize=8)
        seeds = len(next(iter(record["accuracy"].values())).get("runs", [None]))
        figure.suptitle(
            f"Fashion-MNIST MLP, B = {GLOBAL_BATCH}, 1 server, 3 workers (2-core machine, loaded)"
            + (f", {seeds} seeds" if seeds > 1 else "")
        )
        figure.tight_layout()
        figure.savefig(IMG / f"ps-accuracy{suffix}.png", dpi=110)
        plt.close(figure)
    if "pushes" in record:
        sizes = list(record["pushes"]["sizes"])
        figure, axis = plt.subplots(figsize=(6, 3.6))
        width = 0.38
        xs = range(len(sizes))
        ours = [record["pushes"]["sizes"][s]["ours_median"] for s in sizes]
        axis.bar([x - width / 2 for x in xs], ours, width, label="distlearn ps (c10d p2p)")
        if record["pushes"]["ray_version"]:
            ray = [record["pushes"]["sizes"][s]["ray_median"] for s in sizes]
            axis.bar(
                [x + width / 2 for x in xs], ray, width, label=f"Ray actor {record['pushes']['ray_version']}"
            )
        axis.set_xticks(list(xs), [f"{int(s):,} floats" for s in sizes])
        axis.set(ylabel="push+pull round trips / s", yscale="log", title="parameter-server pushes per second")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(IMG / f"ps-pushes{suffix}.png", dpi=110)
        plt.close(figure)


def _under_results(name: str) -> Path:
    """``name`` as given when it has a directory part, else under benchmarks/results/."""
    path = Path(name)
    return path if path.parent != Path(".") else RESULTS / path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "accuracy", "pushes", "codecs"], default="all")
    parser.add_argument("--timeout", type=float, default=1200, help="codecs part: seconds per run")
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", help="accuracy part: one run per seed, mean ± std")
    parser.add_argument("--table", help="with --seeds: the Markdown table of the accuracy or codecs part")
    parser.add_argument(
        "--out",
        default="ps_bench.json",
        help="the result file (JSON); a bare name is written under benchmarks/results/",
    )
    parser.add_argument("--plot-suffix", default="", help="appended to the plot names in docs/img")
    parser.add_argument("--child-train")
    parser.add_argument("--child-pushes")
    args = parser.parse_args()
    if args.child_train:
        child_train(json.loads(args.child_train))
        return 0
    if args.child_pushes:
        child_pushes(json.loads(args.child_pushes))
        return 0
    if args.table and not args.seeds:
        parser.error("--table needs --seeds")
    started, load_before = time.perf_counter(), os.getloadavg()
    results = _under_results(args.out)
    record: dict = json.loads(results.read_text()) if results.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="ps-bench-") as scratch:
        if args.part in ("all", "pushes"):
            record["pushes"] = pushes_part(args, Path(scratch))
        if args.part in ("all", "accuracy"):
            if args.seeds:
                record["accuracy"] = seeded_accuracy_part(args, Path(scratch))
            else:
                record["accuracy"] = accuracy_part(args, Path(scratch))
        if args.part == "codecs":
            record["codecs"] = codecs_part(args, Path(scratch))
    record.update(
        command="python benchmarks/ps_bench.py " + " ".join(sys.argv[1:]),
        machine={
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average": os.getloadavg(),
        },  # fmt: skip
        versions={"torch": str(torch.__version__), "python": platform.python_version()},
        seconds=time.perf_counter() - started,
        # what the machine was doing, from the load averages only (the benchmark's own processes add about 2
        # while it runs): no fixed wording that could contradict them
        note=f"load average (1, 5, 15 min) {', '.join(f'{x:.1f}' for x in load_before)} before the run, "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} after it, on {os.cpu_count()} cores",
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=1) + "\n")
    if args.table:
        made = codecs_table(record["codecs"]) if args.part == "codecs" else seeded_table(record["accuracy"])
        _under_results(args.table).write_text(made)
    plot(record, args.plot_suffix)
    print(f"wrote {results} and docs/img/ps-*{args.plot_suffix}.png in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
