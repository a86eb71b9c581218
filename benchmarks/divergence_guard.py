"""Cost of the divergence guard (distlearn.train.guard) in the trainer loop, guard on against guard off.

Claim (issue 22): the default guard (``--on-nonfinite stop``: the loss kept as a tensor each step, checked
with the weights at each record, evaluation and checkpoint) costs under 1% of the training throughput;
``--on-nonfinite skip`` (a check of the loss and every gradient each step, one host synchronisation)
costs a few percent on a small model.

Method: one process, the MLP on the first 6,400 Fashion-MNIST training images (28x28), batch 128, 200
steps (4 epochs of 50), a record every 50 steps, no checkpoints, samples/s as the trainer reports it
(records included, evaluations excluded). "off" replaces the guard with one that does nothing. The three
variants run interleaved, in a rotating order, ``--trials`` times; we report the median and the best
trial of each and their ratios to "off" (the best trial is the least disturbed on a shared machine). The
guard's own calls are also timed directly (microseconds per step and per check), which load distorts less.

    python benchmarks/divergence_guard.py [--trials 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import distlearn.train.loop as loop
from distlearn.data import load_dataset
from distlearn.models import create_model
from distlearn.parallel import SingleProcess
from distlearn.train import TrainConfig, train
from distlearn.train.guard import DivergenceGuard

SAMPLES, BATCH, STEPS = 6_400, 128, 200


class NoGuard(DivergenceGuard):
    """The guard switched off: every step allowed, nothing kept, nothing checked."""

    def step_allowed(self, loss, model, optimizer, step):  # type: ignore[no-untyped-def]
        self.skipped_last = False
        return True

    def observe(self, loss, step):  # type: ignore[no-untyped-def]
        pass

    def check(self, step, model, optimizer):  # type: ignore[no-untyped-def]
        pass


def run(variant: str, train_set, test_set, out: Path) -> float:
    config = TrainConfig.build(
        dataset="fashion-mnist", model="mlp", optimizer="torch-sgd", lr=0.05, steps=STEPS, batch_size=BATCH,
        train_samples=SAMPLES, test_samples=500, log_every=50, out=str(out), checkpoints=False,
        progress="off", tensorboard="off", quiet=True, deterministic=False,
        on_nonfinite="skip" if variant == "skip" else "stop",
    )  # fmt: skip
    loop.DivergenceGuard = NoGuard if variant == "off" else DivergenceGuard  # type: ignore[misc]
    try:
        return train(config, strategy=SingleProcess(), train_data=train_set, test_data=test_set).samples_per_s
    finally:
        loop.DivergenceGuard = DivergenceGuard  # type: ignore[misc]


def micro(repeats: int = 2000) -> dict[str, float]:
    """Microseconds of the guard's calls on the MLP with real gradients (no training around them)."""
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=28)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    config = TrainConfig.build(model="mlp", out=tempfile.gettempdir(), checkpoints=False)
    timings = {}
    for mode in ("stop", "skip"):
        guard = DivergenceGuard(TrainConfig.build(model="mlp", on_nonfinite=mode, checkpoints=False))
        start = time.perf_counter()
        for step in range(repeats):
            guard.step_allowed(loss, model, optimizer, step)
        timings[f"{mode}_per_step_us"] = 1e6 * (time.perf_counter() - start) / repeats
    guard = DivergenceGuard(config)
    start = time.perf_counter()
    for step in range(repeats // 10):
        guard.losses = [loss.detach()] * 50
        guard.check(step + 1, model, optimizer)
    timings["check_of_50_steps_us"] = 1e6 * (time.perf_counter() - start) / (repeats // 10)
    forward_backward = time.perf_counter()
    for _ in range(50):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    timings["training_step_us"] = 1e6 * (time.perf_counter() - forward_backward) / 50
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/divergence_guard.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    variants = ["off", "stop", "skip"]
    results: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        run("off", train_set, test_set, Path(tmp) / "warm")
        for trial in range(args.trials):
            order = variants[trial % 3 :] + variants[: trial % 3]
            for variant in order:
                results[variant].append(run(variant, train_set, test_set, Path(tmp) / f"{variant}{trial}"))
    timings = micro()
    print(
        f"mlp, {SAMPLES} samples, batch {BATCH}, {STEPS} steps, {args.threads} threads",
        f"{args.trials} trials",
    )
    for variant in variants:
        values = results[variant]
        ratio = statistics.median(values) / statistics.median(results["off"])
        best = max(values) / max(results["off"])
        print(f"{variant:<5} median {statistics.median(values):8.0f} samples/s  ratio {ratio:.3f}  "
              f"best-trial ratio {best:.3f}  (trials {', '.join(f'{v:.0f}' for v in values)})")  # fmt: skip
    print(", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "versions": {"torch": str(torch.__version__)},
        "samples_per_s": results,
        "micro_us": timings,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
