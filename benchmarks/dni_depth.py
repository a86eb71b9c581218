"""DNI depth sweep: backprop vs DNI vs cDNI on FCNs of 3 to 6 layers, several seeds (issue 24, item 3).

Jaderberg et al. (2016), section 3.1: an FCN of L hidden layers of 256 units (ReLU), a decoupled interface
after every hidden layer (one layer per stage, the classifier in the top stage), trained with backprop,
with DNI (synthetic gradients predicted from the activation alone) and with cDNI (conditioned on the label).
The synthetic-gradient model here is the paper's kind -- hidden layers (``--sg-hidden``, default two of the
layer width, 256), zero-initialised output layer, the label one-hot entering its first layer for cDNI --
not the linear model of ``dni_bench.py``.

Everything runs in ONE process (``LocalDNI``; backprop on the whole network): model-parallel backprop across
processes gives the same weights to 1e-5 (tests/dni/test_dni_pipeline.py), and DNI across processes differs
from this only by the gradient delay of ``--max-lag`` (about one step), whose cost dni_bench.py measured.

    python benchmarks/dni_depth.py --datasets fashion-mnist --depths 3 6 --seeds 0 1 2 --fashion-epochs 3
    python benchmarks/dni_depth.py --time-epoch     # seconds of one epoch per (dataset, depth, variant)
    python benchmarks/dni_depth.py --render [--merge PART.json ...]    # the .md table from the .json only

Each finished run is added to benchmarks/results/dni_depth.json at once (a run already there with the same
dataset, depth, variant, seed, epochs and settings is skipped), and benchmarks/results/dni_depth.md is
rendered from the whole file. Datasets: Fashion-MNIST's real 60,000 / 10,000 split and the MNIST test-set
split (8,000 / 2,000): the seeded split of MNIST's 10,000 test images, the only MNIST data here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "dni_depth.json"
MNIST_ROOT = str(ROOT.parent / "shared" / "data")
DATASET_NAMES = {
    "fashion-mnist": "Fashion-MNIST (60,000 / 10,000)",
    "mnist": "MNIST test-set split (8,000/2,000)",
}
VARIANTS = ("backprop", "dni", "cdni")

from distlearn.data import load_dataset  # noqa: E402
from distlearn.dni import LocalDNI, build_model, split_model  # noqa: E402
from distlearn.dni.pipeline import batch_indices  # noqa: E402
from distlearn.models.transforms import BatchTransform  # noqa: E402


def _data(dataset: str):
    root = MNIST_ROOT if dataset == "mnist" else None
    train, test = load_dataset(dataset, "train", root=root), load_dataset(dataset, "test", root=root)
    return train, test, BatchTransform(train.mean, train.std)


def _accuracy(model: nn.Module, test, transform) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(transform(test.images[i : i + 2000])).argmax(1) == test.labels[i : i + 2000]).sum())
            for i in range(0, len(test.labels), 2000)
        )
    model.train()
    return correct / len(test.labels)


def run(
    dataset: str, depth: int, variant: str, seed: int, epochs: int, settings: dict, data=None,
    max_steps: int | None = None,
) -> dict:  # fmt: skip
    """One training run in one process; test accuracy after every epoch."""
    train, test, transform = data or _data(dataset)
    torch.manual_seed(seed)
    model = build_model(
        "mlp", stages=depth, in_channels=1, num_classes=10, image_size=28,
        batch_norm=settings.get("batch_norm", False),
    )  # fmt: skip
    example = transform(train.images[:2])
    lr, sg_lr, batch = settings["lr"], settings["sg_lr"], settings["batch_size"]
    if variant == "backprop":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        pieces = split_model(model, depth, example)
        torch.manual_seed(seed * 1_000_003 + 7)
        dni = LocalDNI(
            pieces, example=example, num_classes=10, conditioned=variant == "cdni",
            sg_hidden=tuple(settings["sg_hidden"]),
            optimizer=lambda p: torch.optim.Adam(p, lr=lr),
            sg_optimizer=lambda p: torch.optim.Adam(p, lr=sg_lr),
        )  # fmt: skip
    steps_per_epoch = len(train.labels) // batch
    per_epoch, losses, sg_losses = [], [], []
    started = time.perf_counter()
    for epoch in range(epochs):
        epoch_loss, epoch_sg = [], []
        for position in range(steps_per_epoch):
            if max_steps is not None and position >= max_steps:
                break
            step = epoch * steps_per_epoch + position
            indices = batch_indices(step, len(train.labels), batch=batch, seed=seed)
            x, y = transform(train.images[indices]), train.labels[indices]
            if variant == "backprop":
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                epoch_loss.append(float(loss.detach()))
            else:
                result = dni.step(x, y)
                epoch_loss.append(float(result.loss))
                epoch_sg.append(result.sg_losses)
        per_epoch.append(_accuracy(model, test, transform))
        losses.append(statistics.fmean(epoch_loss))
        if epoch_sg:
            sg_losses.append([statistics.fmean(column) for column in zip(*epoch_sg, strict=True)])
    return {
        "dataset": dataset, "depth": depth, "variant": variant, "seed": seed, "epochs": epochs,
        "test_accuracy": per_epoch[-1], "per_epoch": per_epoch, "train_loss": losses,
        "sg_loss_per_interface": sg_losses, "seconds": time.perf_counter() - started,
        "settings": settings, "load_average": os.getloadavg(),
    }  # fmt: skip


def _key(row: dict) -> tuple:
    return (row["dataset"], row["depth"], row["variant"], row["seed"], row["epochs"],
            json.dumps(row["settings"], sort_keys=True))  # fmt: skip


def _cell(values: list[float]) -> str:
    if not values:
        return "not run"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (1)"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)})"


def _bn_note(settings: dict) -> str:
    return ", FCN with batch norm" if settings.get("batch_norm") else ""


def render(results: dict, name: str = "dni_depth.json") -> str:
    """The Markdown table of ``results`` (mean ± sample std of final test accuracy over seeds, in %)."""
    rows = results.get("runs", [])
    lines = [
        "# DNI depth sweep: final test accuracy, % (mean ± std over seeds, number of seeds)",
        "",
        f"Rendered by `python benchmarks/dni_depth.py --render` from `benchmarks/results/{name}`; "
        "one process (`LocalDNI`), FCN of L hidden layers of 256 units cut into L stages, synthetic-gradient "
        "models with hidden layers (see the settings column). std is the sample standard deviation.",
        "",
        "| dataset | layers (stages) | epochs | backprop | DNI | cDNI | backprop − DNI | backprop − cDNI "
        "| backprop: last epoch − one before | settings |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = sorted(
        {(r["dataset"], r["depth"], r["epochs"], json.dumps(r["settings"], sort_keys=True)) for r in rows},
        key=lambda g: (g[0] != "fashion-mnist", g[1], g[2], g[3]),
    )
    for dataset, depth, epochs, settings in groups:
        chosen = [
            r for r in rows
            if (r["dataset"], r["depth"], r["epochs"], json.dumps(r["settings"], sort_keys=True))
            == (dataset, depth, epochs, settings)
        ]  # fmt: skip
        by = {v: [r["test_accuracy"] for r in chosen if r["variant"] == v] for v in VARIANTS}
        gaps = []
        for variant in ("dni", "cdni"):
            seeds = sorted({r["seed"] for r in chosen if r["variant"] == variant}
                           & {r["seed"] for r in chosen if r["variant"] == "backprop"})  # fmt: skip
            acc = {(r["variant"], r["seed"]): r["test_accuracy"] for r in chosen}
            diffs = [acc[("backprop", s)] - acc[(variant, s)] for s in seeds]
            gaps.append(_cell(diffs) if diffs else "-")
        backprop_change = [
            r["per_epoch"][-1] - r["per_epoch"][-2] for r in chosen
            if r["variant"] == "backprop" and len(r["per_epoch"]) > 1
        ]  # fmt: skip
        s = json.loads(settings)
        note = (
            f"Adam {s['lr']:g} / SG Adam {s['sg_lr']:g}, SG hidden {tuple(s['sg_hidden'])}, "
            f"batch {s['batch_size']}{_bn_note(s)}"
        )
        lines.append(
            f"| {DATASET_NAMES[dataset]} | {depth} | {epochs} | {_cell(by['backprop'])} | {_cell(by['dni'])} "
            f"| {_cell(by['cdni'])} | {gaps[0]} | {gaps[1]} | {_cell(backprop_change)} | {note} |"
        )
    lines += [
        "",
        "## After the first epoch",
        "",
        "Test accuracy after one epoch of every run, whatever its length: a longer run's first epoch is a "
        "one-epoch run (same seed, weights and batches), so depths trained for different numbers of epochs "
        "compare here.",
        "",
        "| dataset | layers (stages) | steps | backprop | DNI | cDNI | settings |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    first: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in rows:
        group = (r["dataset"], r["depth"], json.dumps(r["settings"], sort_keys=True))
        first.setdefault(group, {v: {} for v in VARIANTS})[r["variant"]][r["seed"]] = r["per_epoch"][0]
    for (dataset, depth, settings), by_variant in sorted(
        first.items(), key=lambda i: (i[0][0] != "fashion-mnist", i[0][1:])
    ):
        s = json.loads(settings)
        steps = {"fashion-mnist": 60_000, "mnist": 8_000}[dataset] // s["batch_size"]
        cells = " | ".join(_cell(list(by_variant[v].values())) for v in VARIANTS)
        lines.append(
            f"| {DATASET_NAMES[dataset]} | {depth} | {steps} | {cells} "
            f"| Adam {s['lr']:g} / SG Adam {s['sg_lr']:g}, SG hidden {tuple(s['sg_hidden'])}{_bn_note(s)} |"
        )
    lines += ["", "Commands run:", ""] + ([results["note"], ""] if results.get("note") else [])
    lines += [
        f"- `{c['command']}` ({c['seconds']:.0f} s, finished {c['finished']})"
        for c in results.get("commands", [])
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", choices=list(DATASET_NAMES), default=["fashion-mnist", "mnist"]
    )
    parser.add_argument("--depths", nargs="+", type=int, default=[3, 4, 5, 6])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fashion-epochs", type=int, default=3)
    parser.add_argument("--mnist-epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam rate of the stages")
    parser.add_argument(
        "--sg-lr", type=float, default=1e-3, help="Adam rate of the synthetic-gradient models"
    )
    parser.add_argument("--sg-hidden", nargs="*", type=int, default=[256, 256],
                        help="hidden widths of each synthetic-gradient model (none: linear)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--batch-norm", action="store_true",
        help="batch norm after each hidden layer's linear map (the paper's FCN); all variants",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-epoch", action="store_true", help="time 20 steps of each run; save nothing")
    parser.add_argument("--render", action="store_true", help="only render the .md from the .json")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=[],
        help="with --render: first gather these result files into --out",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {"runs": [], "commands": []}
    md = args.out.with_suffix(".md")
    if args.render:
        for part in args.merge:
            merged = json.loads(part.read_text())
            keys = {_key(r) for r in results["runs"]}
            results["runs"] += [r for r in merged["runs"] if _key(r) not in keys]
            results["commands"] += [c for c in merged.get("commands", []) if c not in results["commands"]]
            for name in ("machine", "versions"):
                results.setdefault(name, merged.get(name))
        if args.merge:
            results["parts"] = sorted({*results.get("parts", []), *(p.name for p in args.merge)})
            args.out.write_text(json.dumps(results, indent=1))
        md.write_text(render(results, args.out.name))
        print(f"wrote {md}")
        return
    settings = {
        "lr": args.lr,
        "sg_lr": args.sg_lr,
        "sg_hidden": list(args.sg_hidden),
        "batch_size": args.batch_size,
    }
    if args.batch_norm:  # only when set, so the runs saved without the option keep their keys
        settings["batch_norm"] = True
    started = time.perf_counter()
    done = {_key(r) for r in results["runs"]}
    for dataset in args.datasets:
        data = _data(dataset)
        epochs = args.fashion_epochs if dataset == "fashion-mnist" else args.mnist_epochs
        steps_per_epoch = len(data[0].labels) // args.batch_size
        for seed in args.seeds:
            for depth in args.depths:
                for variant in args.variants:
                    if args.time_epoch:
                        row = run(dataset, depth, variant, seed, 1, settings, data, max_steps=20)
                        print(f"{dataset} L={depth} {variant}: {row['seconds'] / 20 * steps_per_epoch:.0f} s "
                              f"per epoch of {steps_per_epoch} steps", flush=True)  # fmt: skip
                        continue
                    key = (dataset, depth, variant, seed, epochs, json.dumps(settings, sort_keys=True))
                    if key in done:
                        continue
                    row = run(dataset, depth, variant, seed, epochs, settings, data)
                    results = json.loads(args.out.read_text()) if args.out.exists() else results
                    results["runs"].append(row)
                    args.out.write_text(json.dumps(results, indent=1))
                    md.write_text(render(results, args.out.name))
                    print(f"{dataset} L={depth} {variant:8s} seed {seed}: "
                          + " ".join(f"{100 * a:.2f}" for a in row["per_epoch"])
                          + f"  ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    if args.time_epoch:
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else results
    results["commands"].append({
        "command": "python benchmarks/dni_depth.py " + " ".join(os.sys.argv[1:]),
        "seconds": time.perf_counter() - started,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    })  # fmt: skip
    results["machine"] = {"platform": platform.platform(), "cores": os.cpu_count()}
    results["versions"] = {"torch": str(torch.__version__), "python": platform.python_version()}
    args.out.write_text(json.dumps(results, indent=1))
    md.write_text(render(results, args.out.name))
    print(f"wrote {args.out} and {md} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
