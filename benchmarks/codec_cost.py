"""What each gradient codec's arithmetic costs against the dense allreduce it replaces, measured in one run.

Claim (issue 6): every codec's encode + decode costs less than the dense allreduce it replaces on a
1 Gb/s network. For each codec and model-sized bucket (LeNet on Fashion-MNIST, ResNet-8 on CIFAR-10, the
bucket the sync strategy sends): the median time of one encode and R decodes (PowerSGD: its whole
compute, matmuls and orthogonalisation; :func:`compression_bench.codec_seconds`), one torch thread,
codecs interleaved over ``--rounds`` rounds; beside it the dense float32 allreduce of the same bucket from
the alpha-beta model (:func:`distlearn.comm.cost_model.project`, ring, R = 2) at 1, 10 and 100 Gb/s with
``--alpha`` seconds per message. Ratio = codec / dense at 1 Gb/s (goal < 1).

    python benchmarks/codec_cost.py [--rounds 5] [--alpha 59e-6] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression_bench import codec_seconds, model_shapes  # noqa: E402
from distlearn.comm.cost_model import link, project  # noqa: E402

CODECS = [
    ("fp16", {}),
    ("bf16", {}),
    ("int8-linear", {}),
    ("int8-tree", {}),
    ("threshold", {}),
    ("onebit", {}),
    ("terngrad", {}),
    ("qsgd", {"levels": 4}),
    ("topk", {"density": 0.001}),
    ("randomk", {"density": 0.001}),
    ("dgc", {"density": 0.001}),
    ("powersgd", {"rank": 2}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them)")
    parser.add_argument("--alpha", type=float, default=59e-6, help="seconds per message (ping-pong fit)")
    parser.add_argument("--datasets", default="fashion-mnist,cifar10")
    today = datetime.date.today().isoformat()
    parser.add_argument("--out", default=f"benchmarks/results/codec_cost-{today}.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dataset in args.datasets.split(","):
        numel = sum(math.prod(s) for s in model_shapes(dataset))
        nbytes = 4 * numel
        dense = {gbps: project("ring", 2, nbytes, link(gbps, alpha=args.alpha)) for gbps in (1, 10, 100)}
        samples: dict[str, list[float]] = {name: [] for name, _ in CODECS}
        for _ in range(args.rounds):
            for name, options in CODECS:
                samples[name].append(codec_seconds(name, options, 2, dataset=dataset, reps=7))
        print(f"\n{dataset}: one bucket of {numel:,} float32 ({nbytes / 1e6:.2f} MB), R = 2")
        print("dense allreduce (model): " + ", ".join(f"{g} Gb/s {s * 1e3:.2f} ms" for g, s in dense.items()))
        print(f"{'codec':<12} {'codec ms':>9} {'min-max':>13} {'/ dense@1Gb/s':>14} {'/ dense@10Gb/s':>15}")
        for name, options in CODECS:
            median = statistics.median(samples[name])
            spread = f"{min(samples[name]) * 1e3:.1f}-{max(samples[name]) * 1e3:.1f}"
            print(
                f"{name:<12} {median * 1e3:>9.2f} {spread:>13} {median / dense[1]:>14.2f} "
                f"{median / dense[10]:>15.2f}"
            )
            rows.append(
                {
                    "dataset": dataset, "codec": name, "options": options, "numel": numel,
                    "codec_s": median, "codec_samples_s": samples[name],
                    "dense_s": {str(g): s for g, s in dense.items()}, "ratio_1gbps": median / dense[1],
                }
            )  # fmt: skip
    record = {
        "benchmark": "codec_cost",
        "command": "python " + " ".join(sys.argv),
        "alpha_s": args.alpha,
        "machine": {"platform": platform.platform(), "threads": 1},
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nraw numbers: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
