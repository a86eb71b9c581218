"""Fit the alpha-beta-gamma cost model to this machine and project the allreduce algorithms to R = 8..256.

Claim (issue 5): the MPICH formulas of Thakur, Rabenseifner & Gropp (2005), fitted to latency and bandwidth
measured here, show how each algorithm scales with the number of workers on 10 and 100 Gb/s networks.

Method:

1. A latency sweep in a torchrun job of R = 2 on 127.0.0.1: ping-pong of c10d ``send``/``recv`` messages
   of 4 B .. 4 MB (median of ``--trials`` round trips / 2), fitted to ``t = alpha + n beta``: the
   point-to-point latency and bandwidth of gloo over loopback.
2. ``gamma``: the time per byte of ``a.add_(b)`` on 16 MB of float32, one thread.
3. The allreduce times of ``benchmarks/results/allreduce_busbw.json`` (run that first) fitted to each
   algorithm's formula with :func:`distlearn.comm.cost_model.fit` (``gamma`` from step 2): alpha and beta
   as the allreduce sees them; the table compares the model with every measured point.
4. Projection: ``alpha`` = the measured point-to-point latency (software overhead that a real network
   only adds to), ``gamma`` measured, ``beta = 8 / (link Gb/s * 1e9)``; time of one allreduce of 64 KB
   and of 25 MB (DDP's default bucket) for R = 8..256, every algorithm, plotted to
   ``docs/img/sync-cost-model.png``; the measured bus bandwidth with the fitted model's curves to
   ``docs/img/sync-busbw.png``. Raw numbers to ``benchmarks/results/cost_model_fit.json``.

    python benchmarks/allreduce_busbw.py && python benchmarks/cost_model_fit.py [--trials 15]

Takes about 30 s. The machine (2 cores) is shared with other processes while measuring: the fitted
alpha in particular includes their scheduling noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distlearn.comm.cost_model import ALGORITHMS, Measurement, bus_bandwidth, fit, link, project
from distlearn.launch import in_torchrun, init_distributed, launch_local, shutdown

PING_SIZES = [4 << (2 * i) for i in range(11)]  # 4 B .. 4 MB
PROJECTED_SIZES = {"64 KB": 64 << 10, "25 MB": 25 << 20}
LINKS_GBPS = (10, 100)
COLORS = {"backend": "0.5", "ring": "C0", "tree": "C1", "rabenseifner": "C2", "segmented-ring": "C3"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busbw", default="benchmarks/results/allreduce_busbw.json")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/cost_model_fit.json")
    parser.add_argument("--plot", default="docs/img/sync-cost-model.png")
    parser.add_argument("--busbw-plot", default="docs/img/sync-busbw.png")
    parser.add_argument("--ping-out", default=None, help=argparse.SUPPRESS)  # set for the workers
    return parser.parse_args(argv)


def ping_pong_worker(args: argparse.Namespace) -> None:
    """Rank 0 and 1 bounce messages; rank 0 writes {bytes: one-way seconds} to ``--ping-out``."""
    import torch.distributed as dist

    context = init_distributed(timeout_s=60)
    peer = 1 - context.rank
    results = {}
    for nbytes in PING_SIZES:
        message = torch.zeros(max(1, nbytes // 4))
        rounds = max(2, min(50, (8 << 20) // nbytes))
        samples = []
        for trial in range(args.trials + 2):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(rounds):
                if context.rank == 0:
                    dist.send(message, peer)
                    dist.recv(message, peer)
                else:
                    dist.recv(message, peer)
                    dist.send(message, peer)
            if trial >= 2:
                samples.append((time.perf_counter() - start) / rounds / 2)
        results[message.numel() * 4] = statistics.median(samples)
    if context.rank == 0:
        Path(args.ping_out).write_text(json.dumps(results))
    shutdown()


def measure_gamma(nbytes: int = 16 << 20, trials: int = 9) -> float:
    """Seconds per byte of an in-place float32 sum (``a += b``) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    a.add_(b)
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        a.add_(b)
        samples.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return statistics.median(samples) / nbytes


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if in_torchrun():
        ping_pong_worker(args)
        return 0
    busbw_path = Path(args.busbw)
    if not busbw_path.exists():
        sys.exit(f"{busbw_path} not found: run `python benchmarks/allreduce_busbw.py` first")
    busbw = json.loads(busbw_path.read_text())
    world = busbw["world_size"]

    with tempfile.TemporaryDirectory() as tmp:
        ping_out = os.path.join(tmp, "ping.json")
        arguments = (sys.argv[1:] if argv is None else argv) + ["--ping-out", ping_out]
        code = launch_local([__file__, *arguments], 2, module=False, timeout_s=180)
        if code != 0:
            sys.exit(f"the ping-pong job failed with exit code {code}")
        ping = {int(k): v for k, v in json.loads(Path(ping_out).read_text()).items()}
    gamma = measure_gamma()

    # 1. point-to-point: t = alpha + n beta (a "ring" of p = 2 has coefficients 2, n, n/2: use them directly)
    import numpy as np

    sizes = np.array(sorted(ping), dtype=np.float64)
    times = np.array([ping[int(s)] for s in sizes])
    weights = 1.0 / times
    design = np.stack([np.ones_like(sizes), sizes], axis=1) * weights[:, None]
    scale = np.abs(design).max(axis=0)
    solution, *_ = np.linalg.lstsq(design / scale, times * weights, rcond=None)
    p2p_alpha, p2p_beta = (solution / scale).tolist()
    print(
        f"point-to-point (ping-pong, R = 2): alpha = {p2p_alpha * 1e6:.1f} us, "
        f"1/beta = {1 / p2p_beta / 1e9:.2f} GB/s"
    )
    print(f"gamma (a += b, float32, 1 thread): {1 / gamma / 1e9:.2f} GB/s")

    # 2. allreduce fits, per algorithm and all together
    rows = busbw["results"]
    fits = {}
    for name in [*ALGORITHMS, "all"]:
        points = [
            Measurement(r["algorithm"], world, r["bytes"], r["median_s"])
            for r in rows
            if name == "all" or r["algorithm"] == name
        ]
        if len(points) >= 2:
            fits[name] = fit(
                points,
                gamma=gamma,
                segment_bytes=busbw.get("segment_bytes", 1 << 20),
                tree_segment_bytes=busbw.get("tree_segment_bytes"),  # absent: results of the unsegmented tree
            )
    print(f"allreduce fits (R = {world}, gamma fixed):")
    for name, result in fits.items():
        print(
            f"  {name:>15}: alpha = {result.alpha * 1e6:8.1f} us, "
            f"1/beta = {1 / max(result.beta, 1e-30) / 1e9:6.2f} GB/s,"
            f" RMS relative error {result.rms_relative_error:.2f}"
        )
    table = []
    for r in rows:
        model = fits.get(r["algorithm"])
        if model is None:
            continue
        predicted = project(
            r["algorithm"], world, r["bytes"], model.network(), segment_bytes=busbw["segment_bytes"],
            tree_segment_bytes=busbw.get("tree_segment_bytes"),
        )  # fmt: skip
        table.append({**{k: r[k] for k in ("algorithm", "bytes", "median_s")}, "model_s": predicted})

    # 3. projection
    alpha = max(p2p_alpha, 0.0)
    networks = {gbps: link(gbps, alpha=alpha, gamma=gamma) for gbps in LINKS_GBPS}
    ranks = sorted({8 << k for k in range(6)} | {12 << k for k in range(5)})  # 8, 12, 16, 24, ..., 192, 256
    projection = {
        f"{gbps} Gb/s": {
            label: {
                name: [project(name, p, nbytes, net) for p in ranks]
                for name in ALGORITHMS
                if name != "backend"
            }
            for label, nbytes in PROJECTED_SIZES.items()
        }
        for gbps, net in networks.items()
    }
    plot_projection(projection, ranks, alpha, gamma, Path(args.plot))
    plot_busbw(rows, fits, world, busbw, Path(args.busbw_plot))

    record = {
        "benchmark": "cost_model_fit",
        "command": " ".join(["python", *sys.argv]),
        "source": str(busbw_path),
        "source_command": busbw.get("command"),
        "ping_pong_one_way_s": ping,
        "p2p_alpha_s": p2p_alpha,
        "p2p_beta_s_per_byte": p2p_beta,
        "gamma_s_per_byte": gamma,
        "allreduce_fits": {name: vars(result) for name, result in fits.items()},
        "model_vs_measured": table,
        "projection": {"ranks": ranks, "alpha_s": alpha, "gamma_s_per_byte": gamma, "seconds": projection},
        "note": "2-core machine shared with other processes while measuring",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}, {args.plot}, {args.busbw_plot}")
    return 0


def plot_projection(projection: dict, ranks: list[int], alpha: float, gamma: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(PROJECTED_SIZES)
    fig, axes = plt.subplots(len(labels), len(projection), figsize=(10, 7.5), sharex=True, squeeze=False)
    for column, (network, by_size) in enumerate(projection.items()):
        for row, label in enumerate(labels):
            ax = axes[row][column]
            for name, seconds in by_size[label].items():
                if name != "rabenseifner":
                    ax.plot(
                        ranks, [t * 1e3 for t in seconds], label=name, color=COLORS[name], lw=1.5, marker="."
                    )
                    continue
                # its fold-in/fold-out steps cost 2 n beta more when R is not a power of two: two series
                for power, style in ((True, "-"), (False, ":")):
                    points = [
                        (p, t) for p, t in zip(ranks, seconds, strict=True) if (p & (p - 1) == 0) == power
                    ]
                    ax.plot(
                        [p for p, _ in points],
                        [t * 1e3 for _, t in points],
                        style,
                        marker="." if power else "x",
                        color=COLORS[name],
                        lw=1.5,
                        label=f"{name} (R = 2^k)" if power else f"{name} (R = 1.5 * 2^k)",
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"allreduce of {label}, {network}")
            ax.set_ylabel("time (ms)")
            ax.grid(True, which="both", alpha=0.3)
            if row == len(labels) - 1:
                ax.set_xlabel("workers R")
    axes[0][0].legend()
    fig.suptitle(
        f"alpha-beta-gamma model (Thakur et al. 2005): alpha = {alpha * 1e6:.0f} us, "
        f"1/gamma = {1 / gamma / 1e9:.1f} GB/s (measured here), beta = 8 / link speed",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_busbw(rows: list[dict], fits: dict, world: int, busbw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in ALGORITHMS:
        mine = sorted((r for r in rows if r["algorithm"] == name), key=lambda r: r["bytes"])
        if not mine:
            continue
        sizes = [r["bytes"] for r in mine]
        ax.errorbar(
            sizes,
            [r["busbw_GBps"] for r in mine],
            yerr=[
                [r["busbw_GBps"] - r["busbw_min_GBps"] for r in mine],
                [r["busbw_max_GBps"] - r["busbw_GBps"] for r in mine],
            ],
            fmt="o",
            ms=4,
            capsize=2,
            color=COLORS[name],
            label=f"{name} (measured)",
        )
        if name in fits:
            dense = [sizes[0] * 2 ** (i / 4) for i in range(int(4 * (len(sizes) - 1) * 2) + 1)]
            model = [
                bus_bandwidth(
                    n,
                    project(
                        name,
                        world,
                        n,
                        fits[name].network(),
                        segment_bytes=busbw["segment_bytes"],
                        tree_segment_bytes=busbw.get("tree_segment_bytes"),
                    ),  # fmt: skip
                    world,
                )
                / 1e9
                for n in dense
            ]
            ax.plot(dense, model, color=COLORS[name], lw=1, alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"allreduce bus bandwidth, R = {world} on 127.0.0.1 (median, min..max; lines: fitted model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
