"""Time from ``distlearn train`` starting to its clear error, for divergence and damaged checkpoints.

Each scenario runs the real command line in a fresh process (``python -m distlearn.cli train ...``, MNIST from
``--data-root``, the MLP, batch 32, one thread) and records its exit status, its wall time (interpreter
start-up and data loading included) and the error's first words. The rows of docs/reliability.md come from
this script:

    python benchmarks/fault_times.py --data-root ../shared/data [--out benchmarks/results/fault_times.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def flags(data_root: str, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "mnist", "--data-root", data_root, "--model", "mlp", "--batch-size", "32",
        "--train-samples", "1024", "--test-samples", "200", "--threads", "1", "--tensorboard", "off",
        "--progress", "off", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def run(arguments: list[str], file_limit: int | None = None) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))

    def limit() -> None:  # a disk that fills up: writes past file_limit bytes fail with EFBIG
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "distlearn.cli", "train", *arguments], capture_output=True,
                          text=True, env=env, timeout=600, preexec_fn=limit)  # fmt: skip
    seconds = time.monotonic() - started
    error = next((line for line in (done.stderr + done.stdout).splitlines() if "error:" in line), "")
    return done.returncode, seconds, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="benchmarks/results/fault_times.json")
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)

        def scenario(name: str, arguments: list[str], file_limit: int | None = None) -> None:
            if args.only not in name:
                return
            status, seconds, error = run(arguments, file_limit)
            rows.append(
                {"scenario": name, "exit": status, "seconds": round(seconds, 1), "error": error[:160]}
            )
            print(f"{name:<34} exit {status}  {seconds:6.1f} s  {error[:110]}", flush=True)

        scenario("baseline: one step, no error", flags(args.data_root, base / "one", "--steps", "1"))
        scenario(
            "checkpoint write past a 1 MB file limit",
            flags(
                args.data_root,
                base / "full",
                "--optimizer",
                "adam",
                "--steps",
                "40",
                "--checkpoint-every",
                "20",
            ),
            file_limit=1 << 20,
        )
        for optimizer in ("sgd", "adam"):
            diverging = ["--optimizer", optimizer, "--lr", "1e6", "--epochs", "5"]
            scenario(f"--lr 1e6, {optimizer}", flags(args.data_root, base / optimizer, *diverging))
        sync = ["--strategy", "sync", "--workers", "2", "--optimizer", "sgd", "--lr", "1e6", "--epochs", "5"]
        scenario("--lr 1e6, sync, 2 ranks", flags(args.data_root, base / "sync", *sync))
        scenario(
            "--lr 1e6, sync --check-every 1",
            flags(args.data_root, base / "check", *sync, "--check-every", "1"),
        )

        if args.only:
            return 0
        good = base / "good"
        status, _, _ = run(flags(args.data_root, good, "--optimizer", "adam", "--steps", "64",
                                 "--checkpoint-every", "32"))  # fmt: skip
        assert status == 0
        newest = good / "checkpoints" / "step-00000064.pt"
        pristine = newest.read_bytes()

        def damaged(name: str, content: bytes) -> None:
            target = base / name.replace(" ", "-")
            shutil.copytree(good, target)
            (target / "checkpoints" / newest.name).write_bytes(content)
            resume = ["--optimizer", "adam", "--steps", "96", "--resume", str(target / "checkpoints")]
            scenario(f"--resume: {name}", flags(args.data_root, target, *resume))

        flipped = bytearray(pristine)
        flipped[len(flipped) // 2] ^= 0x10
        damaged("one flipped bit", bytes(flipped))
        damaged("truncated", pristine[: len(pristine) // 2])
        damaged("random bytes", os.urandom(4096))
        damaged("text file", b"not a checkpoint\n")
        from distlearn.checkpoint import load_checkpoint, write_verified

        state = load_checkpoint(newest)
        state.pop("path")
        missing = {k: v for k, v in state.items() if k != "optimizer"}
        write_verified(missing, base / "missing.pt")
        damaged("missing entry", (base / "missing.pt").read_bytes())
        name = next(iter(state["model"]))
        state["model"][name] = torch.zeros(3, 3)
        write_verified(state, base / "shape.pt")
        damaged("tensor of another shape", (base / "shape.pt").read_bytes())
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": str(torch.__version__)},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
