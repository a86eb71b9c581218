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
tensor, the model's alone, and the strategy's state by value (see :func:`fingerprint`). ``--compare FILE``
compares with an earlier result file and prints, per run, "bitwise" (or "bitwise" for the weights with the
same state tensors under new names) or the largest absolute difference of any weight.

Run manual (about 10 minutes on 2 cores)::

    python benchmarks/weights_fingerprint.py --out benchmarks/results/weights-before.json --tensors DIR
    python benchmarks/weights_fingerprint.py --out benchmarks/results/weights-after.json \\
        --compare benchmarks/results/weights-before.json --compare-tensors DIR

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

from distlearn.checkpoint import load_checkpoint

COMMON = [
    "--dataset", "fashion-mnist", "--model", "mlp", "--train-samples", "1024", "--test-samples", "256",
    "--steps", "16", "--batch-size", "64", "--seed", "0", "--log-every", "4", "--eval-every", "8",
    "--progress", "off", "--tensorboard", "off", "--quiet", "--threads", "1",
]  # fmt: skip
SGD = ["--optimizer", "sgd", "--lr", "0.05"]
REDUCERS = ["backend", "ring", "tree", "rabenseifner", "segmented-ring", "shm", "hierarchical"]
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
    state = load_checkpoint(newest)  # the tree's own reader (checksummed files since issue 22)
    tensors: dict[str, torch.Tensor] = {}
    _tensors("model", state["model"], tensors)
    _tensors("strategy", state.get("strategy") or {}, tensors)
    return tensors


def _bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous().cpu()
    return tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Hashes of the final tensors: all of them by name, the model's by name, the state's by value.

    ``model_sha256`` covers the weights (``model.*``, or every tensor of a DNI network);
    ``state_values_sha256`` the strategy's state tensors as a multiset of (dtype, shape, bytes), names
    left out, so that a state whose layout was reorganised (the codec's residuals under new keys) still
    compares by what it holds.
    """
    digest, model = hashlib.sha256(), hashlib.sha256()
    state_items = []
    max_abs = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        described = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode()
        digest.update(described)
        digest.update(_bytes(tensor))
        if name.startswith("strategy."):
            state_items.append(
                hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode() + _bytes(tensor))
            )
        else:
            model.update(described)
            model.update(_bytes(tensor))
        if tensor.is_floating_point() and tensor.numel():
            max_abs[name] = float(tensor.abs().max())
    state = hashlib.sha256("".join(sorted(item.hexdigest() for item in state_items)).encode())
    return {
        "sha256": digest.hexdigest(),
        "model_sha256": model.hexdigest(),
        "state_values_sha256": state.hexdigest(),
        "tensors": len(tensors),
        "state_tensors": len(state_items),
        "max_abs": max_abs,
    }


def verdict(before: dict[str, Any], after: dict[str, Any], old: dict | None, new: dict) -> str:
    """``bitwise``, ``bitwise (state re-keyed)``, or ``DIFFERENT`` with the largest weight difference."""
    if before["sha256"] == after["sha256"]:
        return "bitwise"
    if before["model_sha256"] == after["model_sha256"]:
        if before["state_values_sha256"] == after["state_values_sha256"]:
            return "bitwise (weights; the same state tensors under new names)"
        return "weights bitwise, STATE DIFFERENT"
    if old is None:
        return "DIFFERENT"
    worst = max(
        float((old[k].double() - new[k].double()).abs().max()) if k in old else float("inf")
        for k in new
        if not k.startswith("strategy.")
    )
    return f"DIFFERENT (max |weight difference| {worst:.3g})"


def from_tensors(directory: Path) -> dict[str, dict[str, Any]]:
    """The fingerprints of the runs whose tensors an earlier invocation kept (``--tensors``)."""
    return {name: fingerprint(torch.load(directory / _file(name), weights_only=True)) for name in runs()}


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
    parser.add_argument(
        "--refingerprint",
        metavar="TENSORS_DIR",
        help="rewrite --out from an earlier invocation's --tensors (after a change of this script's hashes)",
    )
    args = parser.parse_args()
    python = os.environ.get("PYTHON", sys.executable)
    table = runs()
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    if args.refingerprint:
        saved = json.loads(Path(args.out).read_text())
        for name, result in from_tensors(Path(args.refingerprint)).items():
            saved["runs"][name].update(result)
        saved["refingerprinted"] = " ".join(sys.argv)
        Path(args.out).write_text(json.dumps(saved, indent=1) + "\n")
        return 0
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
                old = None
                if args.compare_tensors:
                    old = torch.load(Path(args.compare_tensors) / _file(name), weights_only=True)
                said = verdict(before["runs"][name], result, old, tensors)
                results["runs"][name]["compared"] = said
                line += f"  {said}"
            print(line, flush=True)
            if args.tensors:
                Path(args.tensors).mkdir(parents=True, exist_ok=True)
                torch.save(tensors, Path(args.tensors) / _file(name))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if before is not None:
        differing = [n for n, r in results["runs"].items() if not r.get("compared", "").startswith("bitwise")]
        print(f"{len(results['runs']) - len(differing)} of {len(results['runs'])} runs bitwise equal")
        return 1 if differing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
