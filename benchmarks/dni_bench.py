"""Decoupled neural interfaces: accuracy of backprop, DNI and cDNI; DNI's throughput across processes.

Claims (issue 9), measured in one run on this machine:

1. Accuracy. The paper's FCN (Jaderberg et al. 2016, section 3.1: hidden layers of 256 units, Adam, batch
   256; one hidden layer per stage, K = 3 stages) on MNIST (the seeded 8,000 / 2,000 split of its test
   set: the only MNIST here) and Fashion-MNIST (the real 60,000 / 10,000 split), trained three ways on the
   same 3 processes: model-parallel backprop, DNI and cDNI (synthetic gradients, linear synthetic-gradient
   models, bootstrapped targets), with the same seed, batches and epochs. Beside them the same three in
   one process (``LocalDNI``: no gradient delay), so the cost of the delay across processes shows.
   ``--cnn`` adds LeNet (conv-pool | conv-pool | fc) in 3 stages on MNIST.
2. Throughput. Samples per second of DNI vs model-parallel backprop on the same K ranks (K = 3, 4), and the
   utilisation of each stage (time computing / wall time), ``--trials`` runs each, interleaved.

    python benchmarks/dni_bench.py [--part all|accuracy|throughput] [--mnist-epochs 30] \\
        [--fashion-epochs 3] [--trials 2] [--cnn | --part accuracy --cnn-only --cnn-epochs 2]
    python benchmarks/dni_bench.py --part accuracy --seeds 0 1 2 [--batch-norm] [--cnn-only ...] \\
        --out dni_bench-2026-12-07-seeds.json [--reuse benchmarks/results/dni_bench.json]

Writes benchmarks/results/dni_bench.json (raw numbers, command, machine, versions) and
docs/img/dni-accuracy.png, docs/img/dni-throughput.png. On this 2-core machine K = 3 or 4 processes share
two cores, and other jobs ran at the same time: throughput figures show what decoupling buys when stages
compete for cores, not what it buys with one device per stage.

Seeds (issue 24): ``--seeds`` runs every accuracy configuration once per seed (the seed of the weights, the
synthetic-gradient models and the batch order, in the pipeline and in one process alike); ``--batch-norm``
builds the FCN with batch normalisation (``DNIConfig.batch_norm``). ``--out NAME`` (a bare name goes under
benchmarks/results) keeps every run with its seed and batch-norm setting in ``accuracy`` and writes
``accuracy_summary``: per configuration the mean and sample standard deviation over the seeds of the
3-process accuracy, the one-process accuracy and their difference (the cost of the gradient delay). The file
is written after every run, and a run already in it (or, with ``--reuse FILE``, in that earlier result
file: its runs without a seed are seed 0 without batch norm) is not run again. Only the default file
redraws the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "dni_bench.json"
IMG = ROOT / "docs" / "img"
MNIST_ROOT = str(ROOT.parent / "shared" / "data")

from distlearn.data import load_dataset  # noqa: E402
from distlearn.dni import LocalDNI, SyntheticGradient, build_model, fit_regression, split_model  # noqa: E402
from distlearn.dni.cli import launch  # noqa: E402
from distlearn.dni.pipeline import DNIConfig, batch_indices  # noqa: E402
from distlearn.models.transforms import BatchTransform  # noqa: E402


def _root(dataset: str) -> str | None:
    return MNIST_ROOT if dataset == "mnist" else None


def distributed_run(config: DNIConfig) -> dict:
    """One real job of ``config.stages`` processes (torchrun on 127.0.0.1); its summary."""
    with tempfile.TemporaryDirectory() as out:
        config = dataclasses.replace(config, out=out, quiet=True)
        started = time.perf_counter()
        code = launch(config, timeout_s=900)
        if code != 0:
            raise RuntimeError(f"the job {config} failed with exit code {code}")
        summary = json.loads((Path(out) / "summary.json").read_text())
    summary["job_seconds"] = time.perf_counter() - started
    summary.pop("config", None)
    return summary


def local_run(
    dataset: str, model_name: str, mode: str, epochs: int, *, stages: int = 3, seed: int = 0,
    batch_norm: bool = False,
) -> dict:  # fmt: skip
    """The same training in one process: backprop on the whole network, or LocalDNI (no gradient delay)."""
    torch.set_num_threads(1)
    train, test = (
        load_dataset(dataset, "train", root=_root(dataset)),
        load_dataset(dataset, "test", root=_root(dataset)),
    )
    transform = BatchTransform(train.mean, train.std)
    defaults = DNIConfig()
    torch.manual_seed(seed)
    model = build_model(
        model_name, stages=stages, in_channels=1, num_classes=10, image_size=28, batch_norm=batch_norm
    )
    example = transform(train.images[:2])
    if mode == "backprop":
        optimizer = torch.optim.Adam(model.parameters(), lr=defaults.lr)
    else:
        pieces = split_model(model, stages, example)
        torch.manual_seed(seed * 1_000_003 + 7)
        dni = LocalDNI(
            pieces, example=example, num_classes=10, conditioned=mode == "cdni", sg_hidden=defaults.sg_widths,
            optimizer=lambda p: torch.optim.Adam(p, lr=defaults.lr),
            sg_optimizer=lambda p: torch.optim.Adam(p, lr=defaults.sg_lr),
        )  # fmt: skip
    steps_per_epoch = len(train.labels) // defaults.batch_size
    accuracies = []
    started = time.perf_counter()
    for epoch in range(epochs):
        for position in range(steps_per_epoch):
            step = epoch * steps_per_epoch + position
            indices = batch_indices(step, len(train.labels), batch=defaults.batch_size, seed=seed)
            x, y = transform(train.images[indices]), train.labels[indices]
            if mode == "backprop":
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            else:
                dni.step(x, y)
        model.eval()
        with torch.no_grad():
            correct = sum(
                int(
                    (model(transform(test.images[i : i + 1000])).argmax(1) == test.labels[i : i + 1000]).sum()
                )
                for i in range(0, len(test.labels), 1000)
            )
        model.train()
        accuracies.append(correct / len(test.labels))
    return {
        "test_accuracy": accuracies[-1],
        "per_epoch": accuracies,
        "seconds": time.perf_counter() - started,
    }


def run_key(row: dict) -> tuple:
    """What makes an accuracy run: a run without ``seed``/``batch_norm`` (the one-seed layout) is seed 0
    without batch norm."""
    return (
        row["dataset"], row["model"], row["mode"], row["epochs"], row.get("seed", 0),
        bool(row.get("batch_norm", False)),
    )  # fmt: skip


def accuracy_part(args: argparse.Namespace, done: list[dict] | None = None, save: Any = None) -> list[dict]:
    """Every configuration for every seed (seed outermost, so a stopped run has whole seeds); ``done``:
    runs kept instead of run again; ``save(rows)`` after every run."""
    rows = list(done or [])
    known = {run_key(r) for r in rows}
    plan = [("mnist", "mlp", args.mnist_epochs), ("fashion-mnist", "mlp", args.fashion_epochs)]
    if args.cnn_only:
        plan = []
    if args.cnn or args.cnn_only:
        plan.append(("mnist", "lenet", args.cnn_epochs))
    for seed in args.seeds:
        for dataset, model, epochs in plan:
            for mode in ("backprop", "dni", "cdni"):
                key = (dataset, model, mode, epochs, seed, args.batch_norm)
                if key in known:
                    print(f"{dataset:14s} {model:5s} {mode:8s} seed {seed}: kept (saved run)", flush=True)
                    continue
                config = DNIConfig(
                    dataset=dataset, data_root=_root(dataset), model=model, stages=3, epochs=epochs,
                    mode="backprop" if mode == "backprop" else "dni", cdni=mode == "cdni", seed=seed,
                    batch_norm=args.batch_norm,
                )  # fmt: skip
                summary = distributed_run(config)
                per_epoch = [e["test_accuracy"] for e in summary["evaluations"]]
                local = local_run(dataset, model, mode, epochs, seed=seed, batch_norm=args.batch_norm)
                row = {
                    "dataset": dataset, "model": model, "mode": mode, "epochs": epochs, "stages": 3,
                    "seed": seed, "batch_norm": args.batch_norm,
                    "test_accuracy": summary["test_accuracy"], "per_epoch": per_epoch,
                    "samples_per_s": summary["samples_per_s"],
                    "utilisation": [s["utilisation"] for s in summary["stages"]],
                    "mean_delay": [s["mean_delay"] for s in summary["stages"]],
                    "one_process": local, "dataset_note": summary.get("dataset_note"),
                    "load_average": os.getloadavg(),
                }  # fmt: skip
                rows.append(row)
                known.add(key)
                print(
                    f"{dataset:14s} {model:5s} {mode:8s} seed {seed} bn {int(args.batch_norm)}: 3 processes "
                    f"{100 * row['test_accuracy']:6.2f}%  one process {100 * local['test_accuracy']:6.2f}%",
                    flush=True,
                )
                if save is not None:
                    save(rows)
    return rows


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value) and n."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def summarise_accuracy(rows: list[dict]) -> list[dict]:
    """Per (dataset, model, epochs, batch norm, mode): accuracy of 3 processes, of one process and the
    difference one process - 3 processes (each seed's pair), in percentage points, over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        dataset, model, mode, epochs, _seed, batch_norm = run_key(row)
        groups.setdefault((dataset, model, epochs, batch_norm, mode), []).append(row)
    table = []
    for (dataset, model, epochs, batch_norm, mode), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        processes = [100 * r["test_accuracy"] for r in runs]
        one = [100 * r["one_process"]["test_accuracy"] for r in runs]
        table.append({
            "dataset": dataset, "model": model, "epochs": epochs, "batch_norm": batch_norm, "mode": mode,
            "seeds": [r.get("seed", 0) for r in runs],
            "three_processes": mean_std(processes), "one_process": mean_std(one),
            "delay_cost": mean_std([a - b for a, b in zip(one, processes, strict=True)]),
        })  # fmt: skip
    return table


def throughput_part(args: argparse.Namespace) -> list[dict]:
    rows = []
    for stages in (3, 4):
        for trial in range(args.trials):
            for mode in ("backprop", "dni"):  # interleaved, so load changes hit both alike
                config = DNIConfig(
                    dataset="mnist", data_root=MNIST_ROOT, model="mlp", stages=stages, mode=mode,
                    steps=args.throughput_steps, eval_every_epoch=False,
                )  # fmt: skip
                summary = distributed_run(config)
                rows.append({
                    "stages": stages, "mode": mode, "trial": trial, "samples_per_s": summary["samples_per_s"],
                    "utilisation": [s["utilisation"] for s in summary["stages"]],
                    "wait_input_s": [s["wait_input_s"] for s in summary["stages"]],
                    "wait_gradient_s": [s["wait_gradient_s"] for s in summary["stages"]],
                    "stage_parameters": summary["stage_costs"], "load_average": os.getloadavg(),
                })  # fmt: skip
                print(
                    f"K={stages} {mode:8s} trial {trial}: {summary['samples_per_s']:7.0f} samples/s, "
                    "utilisation " + ", ".join(f"{100 * u:.0f}%" for u in rows[-1]["utilisation"]),
                    flush=True,
                )
    return rows


def stage_times(stages: int, repeats: int = 30, batch: int = 256) -> dict:
    """Per-step compute time of each stage in one process (one thread, no contention, no messages).

    backprop: the stage's forward + backward + Adam step; dni: the same plus, below the top, the synthetic
    gradient's prediction and one fit of it. Projection to one core per stage (communication ignored):
    backprop's stages take turns, ``B / sum_k t_k``; DNI's run at the slowest stage's pace, ``B / max_k t_k``.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    defaults = DNIConfig()
    model = build_model("mlp", stages=stages)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    pieces = split_model(model, stages, x[:2])
    times: dict[str, list[float]] = {"backprop": [], "dni": []}
    h = x
    for k, piece in enumerate(pieces):
        optimizer = torch.optim.Adam(piece.parameters(), lr=defaults.lr)
        with torch.no_grad():
            out_shape = piece(h[:2]).shape[1:]
        synthetic = SyntheticGradient(out_shape, hidden=defaults.sg_widths)
        sg_optimizer = torch.optim.Adam(synthetic.parameters(), lr=defaults.sg_lr)
        for mode in ("backprop", "dni"):
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                inp = h.detach().requires_grad_(k > 0)
                optimizer.zero_grad()
                out = piece(inp)
                if k == stages - 1:
                    nn.functional.cross_entropy(out, y).backward()
                elif mode == "dni":
                    with torch.no_grad():
                        gradient = synthetic(out.detach()) / batch
                    out.backward(gradient)
                    fit_regression(synthetic, sg_optimizer, (out.detach(), y), torch.randn_like(out) * 1e-3)
                else:
                    out.backward(torch.randn_like(out) * 1e-3)
                optimizer.step()
                samples.append(time.perf_counter() - started)
            times[mode].append(statistics.median(samples[repeats // 5 :]))
        with torch.no_grad():
            h = piece(h)
    return {
        "stages": stages,
        "seconds_per_step": times,
        "projected_samples_per_s": {
            "backprop": batch / sum(times["backprop"]),
            "dni": batch / max(times["dni"]),
        },
    }


def summarise_throughput(rows: list[dict]) -> list[dict]:
    table = []
    for stages in sorted({r["stages"] for r in rows}):
        entry: dict = {"stages": stages}
        for mode in ("backprop", "dni"):
            runs = [r for r in rows if r["stages"] == stages and r["mode"] == mode]
            speeds = [r["samples_per_s"] for r in runs]
            per_stage = zip(*[r["utilisation"] for r in runs], strict=True)
            entry[mode] = {
                "median_samples_per_s": statistics.median(speeds),
                "min": min(speeds), "max": max(speeds),
                "utilisation": [statistics.mean(u) for u in per_stage],
            }  # fmt: skip
        entry["speedup"] = entry["dni"]["median_samples_per_s"] / entry["backprop"]["median_samples_per_s"]
        table.append(entry)
    return table


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    accuracy = results.get("accuracy") or []
    if accuracy:
        groups = sorted(
            {(r["dataset"], r["model"]) for r in accuracy}, key=lambda g: (g[1] != "mlp", g[0] != "mnist")
        )
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
        for axis, (dataset, model) in zip(axes[0], groups, strict=True):
            for r in [r for r in accuracy if (r["dataset"], r["model"]) == (dataset, model)]:
                epochs = range(1, len(r["per_epoch"]) + 1)
                line = axis.plot(
                    epochs, [100 * a for a in r["per_epoch"]], label=f"{r['mode']} (3 processes)"
                )
                axis.plot(
                    epochs, [100 * a for a in r["one_process"]["per_epoch"]], linestyle="--",
                    color=line[0].get_color(), alpha=0.6, label=f"{r['mode']} (one process)",
                )  # fmt: skip
            axis.set_title(f"{dataset}, {model}, 3 stages")
            axis.set_xlabel("epoch")
            axis.set_ylabel("test accuracy (%)")
            axis.set_ylim(bottom=max(0, axis.get_ylim()[0]))
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(IMG / "dni-accuracy.png", dpi=120)
        plt.close(fig)
    table = results.get("throughput_table") or []
    if table:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        labels = [f"K={t['stages']}" for t in table]
        positions = range(len(table))
        for offset, mode in ((-0.2, "backprop"), (0.2, "dni")):
            medians = [t[mode]["median_samples_per_s"] for t in table]
            errors = [
                [m - t[mode]["min"] for m, t in zip(medians, table, strict=True)],
                [t[mode]["max"] - m for m, t in zip(medians, table, strict=True)],
            ]
            left.bar([p + offset for p in positions], medians, width=0.4, yerr=errors, label=mode, capsize=3)
        left.set_xticks(list(positions), labels)
        left.set_ylabel("samples/s (median, min-max)")
        left.set_title("MLP on MNIST, one stage per process")
        left.legend()
        width = 0.8 / (2 * max(t["stages"] for t in table))
        for index, t in enumerate(table):
            for m_index, mode in enumerate(("backprop", "dni")):
                for k, u in enumerate(t[mode]["utilisation"]):
                    x = index + (m_index * t["stages"] + k - t["stages"]) * width
                    right.bar(x, 100 * u, width=width * 0.9, color="C0" if mode == "backprop" else "C1")
        right.set_xticks(list(positions), labels)
        right.set_ylabel("stage utilisation (%)")
        right.set_title("stages 0..K-1: backprop (blue), dni (orange)")
        fig.tight_layout()
        fig.savefig(IMG / "dni-throughput.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "accuracy", "throughput", "stage-times"], default="all")
    parser.add_argument("--mnist-epochs", type=int, default=30)
    parser.add_argument("--fashion-epochs", type=int, default=3)
    parser.add_argument("--cnn", action="store_true", help="add LeNet in 3 stages on MNIST")
    parser.add_argument("--cnn-epochs", type=int, default=3)
    parser.add_argument(
        "--cnn-only", action="store_true", help="run only the LeNet rows; keep the saved MLP rows beside them"
    )
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--throughput-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="accuracy runs: one per seed")
    parser.add_argument("--batch-norm", action="store_true", help="the FCN with batch norm (accuracy part)")
    parser.add_argument(
        "--out", help="result file (a bare name: under benchmarks/results); its runs are kept, not rerun"
    )
    parser.add_argument("--reuse", help="an earlier result file whose matching accuracy runs are kept")
    args = parser.parse_args()
    path = RESULTS if args.out is None else Path(args.out)
    if args.out is not None and path.parent == Path("."):
        path = RESULTS.parent / path
    results: dict = json.loads(path.read_text()) if path.exists() else {}
    started = time.perf_counter()

    def save(rows: list[dict]) -> None:
        results["accuracy"] = rows
        results["accuracy_summary"] = summarise_accuracy(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    if args.part in ("all", "accuracy") and path == RESULTS:
        kept = [r for r in results.get("accuracy", []) if r["model"] != "lenet"] if args.cnn_only else []
        results["accuracy"] = kept + accuracy_part(args)
    elif args.part in ("all", "accuracy"):  # several seeds into a new file: keep what it (or --reuse) has
        done = results.get("accuracy", [])
        if args.reuse:
            have = {run_key(r) for r in done}
            earlier = json.loads(Path(args.reuse).read_text()).get("accuracy", [])
            for row in earlier:
                if run_key(row) not in have:
                    seed, batch_norm = row.get("seed", 0), row.get("batch_norm", False)
                    done.append({**row, "seed": seed, "batch_norm": batch_norm, "reused_from": args.reuse})
        save(accuracy_part(args, done, save))
    if args.part in ("all", "throughput"):
        results["throughput"] = throughput_part(args)
        results["throughput_table"] = summarise_throughput(results["throughput"])
    if args.part in ("all", "throughput", "stage-times"):
        results["stage_times"] = [stage_times(k) for k in (3, 4)]
        for entry in results["stage_times"]:
            projected = entry["projected_samples_per_s"]
            print(
                f"K={entry['stages']} one core per stage (projected): backprop {projected['backprop']:.0f}, "
                f"dni {projected['dni']:.0f} samples/s"
            )
        for t in results.get("throughput_table", []):
            print(
                f"K={t['stages']}: backprop {t['backprop']['median_samples_per_s']:.0f}, "
                f"dni {t['dni']['median_samples_per_s']:.0f} samples/s (x{t['speedup']:.2f})"
            )
    command = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    commands = results.setdefault("commands", {})
    if "command" in results:  # the layout of the first run: one command for everything
        commands["all"] = {"command": results.pop("command"), "seconds": results.pop("seconds", None)}
    label = "cnn" if args.cnn_only else args.part
    if args.out is not None:  # one entry per invocation: the seeds and batch norm differ between them
        label = f"{label} seeds {' '.join(map(str, args.seeds))}" + (" batch-norm" if args.batch_norm else "")
    commands[label] = {
        "command": command, "seconds": time.perf_counter() - started,
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    results["machine"] = {
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    results["versions"] = {"torch": str(torch.__version__), "python": platform.python_version()}
    results["settings"] = dataclasses.asdict(DNIConfig())
    if "accuracy" in results and path != RESULTS:
        results["accuracy_summary"] = summarise_accuracy(results["accuracy"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    if path == RESULTS:
        plot(results)
    for entry in results.get("accuracy_summary", []) if path != RESULTS else []:
        three, one = entry["three_processes"], entry["one_process"]
        print(
            f"{entry['dataset']:14s} {entry['model']:5s} bn {int(entry['batch_norm'])} {entry['mode']:8s} "
            f"n={three['n']}: 3 processes {three['mean']:.2f} +- {three['std'] or 0:.2f}, one process "
            f"{one['mean']:.2f} +- {one['std'] or 0:.2f}, delay cost {entry['delay_cost']['mean']:.2f}"
        )
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
