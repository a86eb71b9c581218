"""Final-weight fingerprints of every deterministic run: the evidence that a redesign kept behaviour.

Claim checked: a refactor of distlearn's centre (issue 19) leaves the final weights of every deterministic
run unchanged, bitwise. Each run trains a small MLP for a fixed seed and budget through the command line
(whose flags are the stable contract), then the final checkpoint's tensors are hashed:

* one process; sync (R = 2) with each allreduce algorithm; sync with each gradient codec; local SGD;
  synchronous EASGD: the newest ``OUT/checkpoints/step-*.pt`` -- the model and the strategy's state
  (codec residuals, EASGD's centre), each tensor by name;
* DNI and cDNI (3 stages, one process each) and model-parallel backprop: ``OUT/model.pt`` written by rank 0
  (``python -m distlearn.dni.cli --save-model``).

For each run: a SHA-256 over every tensor's name, dtype, shape and bytes, in name order, and max |w| per
tensor. ``--compare FILE`` compares with an earlier result file and prints, per run, "bitwise" or the
largest absolute difference of any tensor.

Run manual (about 10 minutes on 2 cores)::

    python benchmarks/weights_fingerprint.py --out benchmarks/results/weights-before.json
    python benchmarks/weights_fingerprint.py --out benchmarks/results/weights-after.json \\
        --compare benchmarks/results/weights-before.json

Environment: PYTHON (the interpreter whose distlearn runs, default this one); the runs need Fashion-MNIST
(Debian's dataset-fashion-mnist, or DISTLEARN_DATA).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

COMMON = [
    "--dataset", "fashion-mnist", "--model", "mlp", "--train-samples", "1024", "--test-samples", "256",
    "--steps", "16", "--batch-size", "64", "--seed", "0", "--log-every", "4", "--eval-every", "8",
    "--progress", "off", "--tensorboard", "off", "--quiet", "--threads", "1",
]  # fmt: skip
SGD = ["--optimizer", "sgd", "--lr", "0.05"]
REDUCERS = ["backend", "ring", "tree", "rabenseifner", "segmented-ring"]
CODECS = [
    "fp16", "bf16", "int8-linear", "int8-tree", "threshold", "onebit", "terngrad", "qsgd", "topk", "randomk",
    "dgc", "powersgd",
]  # fmt: skip


def runs() -> dict[str, list[str]]:
    """Run name -> ``distlearn train`` arguments (or ``dni:`` + ``distlearn.dni.cli`` arguments)."""
    table: dict[str, list[str]] = {"single": ["--optimizer", "adam"]}
    for reducer in REDUCERS:  # small buckets, so that several buckets and the reducer's segments are used
        table[f"sync reducer={reducer}"] = [
            "--strategy", "sync", "--workers", "2", "--reducer", reducer, "--bucket-mb", "0.05", *SGD,
        ]  # fmt: skip
    for codec in CODECS:
        table[f"sync compression={codec}"] = [
            "--strategy", "sync", "--workers", "2", "--compression", codec, "--bucket-mb", "0.05", *SGD,
        ]  # fmt: skip
    table["local-sgd k=4"] = ["--strategy", "local-sgd", "--workers", "2", "--average-every", "4", *SGD]
    table["easgd sync tau=2"] = [
        "--strategy", "easgd", "--workers", "2", "--easgd-mode", "sync", "--elastic-tau", "2", *SGD,
    ]  # fmt: skip
    dni = [
        "--dataset", "fashion-mnist", "--model", "mlp", "--stages", "3", "--train-samples", "1024",
        "--test-samples", "256", "--steps", "16", "--batch-size", "64", "--seed", "0", "--quiet",
        "--save-model",
    ]  # fmt: skip
    table["dni backprop 3 stages"] = ["dni:", *dni, "--mode", "backprop"]
    table["dni 3 stages"] = ["dni:", *dni, "--mode", "dni"]
    table["cdni 3 stages"] = ["dni:", *dni, "--mode", "dni", "--cdni"]
    return table


def _tensors(prefix: str, value: Any, into: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        into[prefix] = value
    elif isinstance(value, dict):
        for key in value:
            _tensors(f"{prefix}.{key}" if prefix else str(key), value[key], into)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _tensors(f"{prefix}.{i}", item, into)


def final_tensors(out: Path, dni: bool) -> dict[str, torch.Tensor]:
    """The run's final tensors by name: the model, and the strategy's state where there is one."""
    if dni:
        return dict(torch.load(out / "model.pt", weights_only=True))
    newest = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    tensors: dict[str, torch.Tensor] = {}
    _tensors("model", state["model"], tensors)
    _tensors("strategy", state.get("strategy") or {}, tensors)
    return tensors


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    digest = hashlib.sha256()
    max_abs = {}
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        if tensor.is_floating_point() and tensor.numel():
            max_abs[name] = float(tensor.abs().max())
    return {"sha256": digest.hexdigest(), "tensors": len(tensors), "max_abs": max_abs}


def _file(name: str) -> str:
    return name.replace(" ", "_").replace("=", "-") + ".pt"


def run_one(python: str, name: str, args: list[str], work: Path) -> tuple[dict[str, Any], dict]:
    """Train run ``name`` in a fresh process; its fingerprint and final tensors."""
    out = work / _file(name).removesuffix(".pt")
    dni = bool(args) and args[0] == "dni:"
    if dni:
        command = [python, "-m", "distlearn.dni.cli", *args[1:], "--out", str(out)]
    else:
        command = [python, "-m", "distlearn.cli", "train", *COMMON, *args, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{' '.join(command)}\n{done.stderr[-3000:]}")
    tensors = final_tensors(out, dni)
    result = fingerprint(tensors)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result, tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="result JSON file")
    parser.add_argument("--compare", help="an earlier result file: report bitwise / max difference per run")
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    parser.add_argument("--tensors", help="directory to keep each run's final tensors in (RUN.pt)")
    parser.add_argument(
        "--compare-tensors",
        help="the earlier run's --tensors directory (elementwise diffs)",
    )
    args = parser.parse_args()
    python = os.environ.get("PYTHON", sys.executable)
    table = runs()
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    before = json.loads(Path(args.compare).read_text()) if args.compare else None
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "commit": git,
        "torch": torch.__version__,
        "common_flags": COMMON,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="distlearn-fingerprint-") as tmp:
        for name, run_args in table.items():
            result, tensors = run_one(python, name, run_args, Path(tmp))
            results["runs"][name] = {"args": run_args, **result}
            line = f"{name:32s} {result['sha256'][:16]}  {result['tensors']:3d} tensors"
            line += f"  {result['seconds']:5.1f} s"
            if before is not None and name in before["runs"]:
                then = before["runs"][name]
                if then["sha256"] == result["sha256"]:
                    verdict = "bitwise"
                elif args.compare_tensors:
                    old = torch.load(Path(args.compare_tensors) / _file(name), weights_only=True)
                    worst = max(
                        float((old[k].double() - tensors[k].double()).abs().max())
                        if k in old
                        else float("inf")
                        for k in tensors
                    )
                    verdict = f"DIFFERENT (max |difference| {worst:.3g})"
                else:
                    verdict = "DIFFERENT"
                results["runs"][name]["compared"] = verdict
                line += f"  {verdict}"
            print(line, flush=True)
            if args.tensors:
                Path(args.tensors).mkdir(parents=True, exist_ok=True)
                torch.save(tensors, Path(args.tensors) / _file(name))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if before is not None:
        differing = [n for n, r in results["runs"].items() if r.get("compared", "bitwise") != "bitwise"]
        print(f"{len(results['runs']) - len(differing)} of {len(results['runs'])} runs bitwise equal")
        return 1 if differing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
