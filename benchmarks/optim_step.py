"""Time per optimizer step: distlearn.optim against torch.optim, measured side by side in one run.

Claim (issue 3): on CPU, for a model with about 100 parameter tensors and 1M parameters, our step takes
at most 0.8x the time of torch.optim's default step for every method torch.optim also has (torch's CPU
default is its per-tensor loop). Three tables: ours by default (the foreach path) against torch's
default; ours with ``flat=True`` (one buffer per group, one kernel per operation) against torch's
default; and both with foreach=True.

Method: 50 Linear(141, 141) layers = 100 tensors, 1,001,100 parameters, float32; gradients filled once
with random values; each trial times ``repeats`` calls of ``step()`` after a warm-up; trials of the
optimizers are interleaved so that machine noise hits all of them alike; we report the median over
trials and the ratio of medians (ours / torch), wall-clock and, less moved by other processes on a
shared machine, CPU time of the thread; and the minor page faults per step (fresh memory mapped by the
kernel, each one costly on a virtual machine). Runs in about a minute on 2 idle cores.

    python benchmarks/optim_step.py [--trials 7] [--repeats 20] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from distlearn import optim

METHODS = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(141, 141) for _ in range(50)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return model


def time_steps(opt: torch.optim.Optimizer, repeats: int) -> tuple[float, float, float]:
    """Per step: wall seconds, CPU seconds of this thread, and minor page faults.

    CPU time leaves out the time the thread waited for a core, so on a shared machine its ratio moves
    less than the wall-clock one; page faults count the fresh memory a step had the kernel map.
    """
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu = time.thread_time()
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    seconds = (time.perf_counter() - start) / repeats
    cpu_seconds = (time.thread_time() - cpu) / repeats
    return seconds, cpu_seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    today = datetime.date.today().isoformat()
    parser.add_argument("--out", default=f"benchmarks/results/optim_step-{today}.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = make_model()
    params = list(model.parameters())
    size = sum(p.numel() for p in params)
    print(f"model: {len(params)} tensors, {size:,} parameters; torch {torch.__version__}")
    contenders = {}
    for name in METHODS:
        equivalent = optim.torch_equivalent(name)
        torch_kwargs = {k: v for k, v in equivalent.kwargs.items() if k != "foreach"}
        contenders[(name, "default")] = (
            lambda n=name: optim.create(n, params),
            lambda c=equivalent.cls, k=torch_kwargs: c(params, **k),
        )
        flat_params = list(make_model().parameters())  # its own model: flat=True rebinds the storage
        contenders[(name, "flat")] = (
            lambda n=name, fp=flat_params: optim.create(n, fp, flat=True),
            lambda c=equivalent.cls, k=torch_kwargs: c(params, **k),
        )
        contenders[(name, "foreach")] = (
            lambda n=name: optim.create(n, params, foreach=True),
            lambda c=equivalent.cls, k=torch_kwargs: c(params, foreach=True, **k),
        )
    # Optimizers change the weights; the step time does not depend on their values at these scales.
    built = {key: (ours(), theirs()) for key, (ours, theirs) in contenders.items()}
    load_at_start = list(os.getloadavg())
    for ours, theirs in built.values():  # warm-up: creates the state buffers
        time_steps(ours, 3)
        time_steps(theirs, 3)
    samples: dict[tuple[str, str], dict[str, list[float]]] = {k: {"ours": [], "torch": []} for k in built}
    cpu: dict[tuple[str, str], dict[str, list[float]]] = {k: {"ours": [], "torch": []} for k in built}
    faults: dict[tuple[str, str], dict[str, list[float]]] = {k: {"ours": [], "torch": []} for k in built}
    for _ in range(args.trials):
        for key, (ours, theirs) in built.items():
            for side, opt in (("ours", ours), ("torch", theirs)):
                seconds, cpu_seconds, per_step = time_steps(opt, args.repeats)
                samples[key][side].append(seconds)
                cpu[key][side].append(cpu_seconds)
                faults[key][side].append(per_step)

    rows = []
    labels = {
        "default": ("foreach=None (foreach path)", "foreach=None (per-tensor loop on CPU)"),
        "flat": ("flat=True (one buffer per group)", "foreach=None (per-tensor loop on CPU)"),
        "foreach": ("foreach=True", "foreach=True"),
    }
    for mode, (ours_label, torch_label) in labels.items():
        print(f"\n{mode}: ours {ours_label} vs torch.optim {torch_label}")
        header = f"{'method':<10} {'ours ms':>9} {'torch ms':>9} {'ratio':>7}  spread(ours/torch, ms)"
        print(header + "  cpu ratio  page faults/step (ours/torch)")
        for name in METHODS:
            s = samples[(name, mode)]
            ours_ms, torch_ms = statistics.median(s["ours"]) * 1e3, statistics.median(s["torch"]) * 1e3
            ratio = ours_ms / torch_ms
            spread = (
                f"{min(s['ours']) * 1e3:.2f}-{max(s['ours']) * 1e3:.2f} / "
                f"{min(s['torch']) * 1e3:.2f}-{max(s['torch']) * 1e3:.2f}"
            )
            verdict = "ok" if ratio <= 0.8 or mode == "foreach" else "ABOVE 0.8"
            ours_faults = statistics.median(faults[(name, mode)]["ours"])
            torch_faults = statistics.median(faults[(name, mode)]["torch"])
            c = cpu[(name, mode)]
            ours_cpu_ms = statistics.median(c["ours"]) * 1e3
            torch_cpu_ms = statistics.median(c["torch"]) * 1e3
            print(
                f"{name:<10} {ours_ms:>9.3f} {torch_ms:>9.3f} {ratio:>7.2f}  {spread}  "
                f"{ours_cpu_ms / torch_cpu_ms:>9.2f}  {ours_faults:.0f}/{torch_faults:.0f}  {verdict}"
            )
            row = {"method": name, "mode": mode, "ours_ms": ours_ms, "torch_ms": torch_ms, "ratio": ratio}
            row.update(ours_cpu_ms=ours_cpu_ms, torch_cpu_ms=torch_cpu_ms)
            row.update(cpu_ratio=ours_cpu_ms / torch_cpu_ms)
            row.update(ours_faults_per_step=ours_faults, torch_faults_per_step=torch_faults)
            row.update(ours_cpu_samples_s=c["ours"], torch_cpu_samples_s=c["torch"])
            rows.append({**row, "ours_samples_s": s["ours"], "torch_samples_s": s["torch"]})
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
            "load_average_at_start_and_end": [load_at_start, list(os.getloadavg())],
        },
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        "trials": args.trials,
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nraw numbers: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
