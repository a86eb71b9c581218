"""``distlearn bench``: run a suite, write results (JSON, Markdown, plots), or compare two result files.

Run manual::

    distlearn bench --suite quick                    # every strategy on Fashion-MNIST, a few minutes
    distlearn bench --suite fashion-mnist --only sync,ddp,single
    distlearn bench --suite toy                      # every optimizer on every toy problem
    distlearn bench --compare benchmarks/results/bench-quick-A.json benchmarks/results/bench-quick-B.json
    distlearn bench --render benchmarks/results/bench-quick-A.json   # its table, with today's projection

Each run writes ``OUT/bench-<suite>-<timestamp>.json`` (raw results with machine, cores, versions, git
commit and command), ``.md`` (the table) and ``.png`` (accuracy against wall time, updates and bytes sent),
never overwriting earlier results, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from distlearn.bench.harness import run_suite
from distlearn.bench.report import compare, environment, markdown, plot
from distlearn.bench.suites import SUITES, get_suite
from distlearn.errors import ConfigError

__all__ = ["add_arguments", "run"]

DELEGATED = {"toy", "comm", "rl"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        default="quick",
        help=f"which work: {', '.join([*SUITES, *sorted(DELEGATED)])} (default quick)",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated parts of strategy labels to run (default all)"
    )
    parser.add_argument(
        "--out", default="benchmarks/results", help="directory for the JSON, Markdown and plot"
    )
    parser.add_argument("--runs", default="runs/bench", help="directory for the individual runs")
    parser.add_argument("--data-root", default=None, help="dataset directory (as for distlearn train)")
    parser.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="show two result files side by side"
    )
    parser.add_argument(
        "--render",
        metavar="RESULTS.json",
        default=None,
        help="print the table of a result file again, computed from its raw results by this version "
        "(e.g. after the projection changed); the file and its stored .md are left as they are",
    )
    parser.add_argument("--progress", choices=("on", "off"), default="on")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUNS_DIR",
        help="continue a stopped invocation: read back the runs in RUNS_DIR (e.g. runs/bench/"
        "fashion-mnist-20261201-012903) that finished, run the others; the results keep its time stamp",
    )


def run(args: argparse.Namespace) -> int:
    if args.compare:
        for path in args.compare:
            if not Path(path).is_file():
                raise ConfigError(
                    f"--compare: {path} does not exist; pass two files written by distlearn bench"
                )
        print(compare(Path(args.compare[0]), Path(args.compare[1])), end="")
        return 0
    if args.render:
        print(_render(Path(args.render)), end="")
        return 0
    if args.suite in DELEGATED:
        return _delegated(args)
    suite = get_suite(args.suite)
    if args.data_root:
        suite = replace(suite, data_root=args.data_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = Path(args.runs) / f"{suite.name}-{stamp}"
    if args.resume:
        runs_dir = Path(args.resume)
        if not runs_dir.is_dir() or not runs_dir.name.startswith(f"{suite.name}-"):
            raise ConfigError(
                f"--resume {args.resume}: not a runs directory of the {suite.name} suite; pass the "
                f"directory a stopped `distlearn bench --suite {suite.name}` made, e.g. "
                f"{args.runs}/{suite.name}-YYYYMMDD-HHMMSS"
            )
        stamp = runs_dir.name.removeprefix(f"{suite.name}-")
    only = [part.strip() for part in args.only.split(",")] if args.only else None
    results = run_suite(suite, runs_dir, progress=args.progress == "on", only=only, resume=bool(args.resume))
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench-{suite.name}-{stamp}"
    record = {
        "suite": suite.name,
        "global_batch": suite.global_batch,
        "target": suite.target,
        "description": suite.description,
        "environment": env,
        "results": results,
    }
    base.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(suite, results, env)
    base.with_suffix(".md").write_text(table)
    plot(results, base.with_suffix(".png"), f"{suite.name}: {suite.model} on {suite.dataset}")
    print(table, end="")
    json_path, md_path, png_path = (base.with_suffix(x) for x in (".json", ".md", ".png"))
    print(f"\nraw results {json_path}, table {md_path}, plot {png_path}")
    return 0 if any(r["status"] == "ok" for r in results) else 1


def _render(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        results, env = record["results"], record["environment"]
        suite = replace(  # as the file says it was run, whatever the suite's definition is now
            get_suite(record["suite"]),
            global_batch=record["global_batch"],
            target=record["target"],
            description=record["description"],
        )
    except FileNotFoundError:
        raise ConfigError(
            f"--render: {path} does not exist; pass a file written by distlearn bench"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(
            f"--render: {path} is not a result file of distlearn bench ({type(error).__name__}: {error})"
        ) from error
    return markdown(suite, results, env)


def _delegated(args: argparse.Namespace) -> int:
    """The suites whose work is not a training run: they call the matching tool and keep its output."""
    if args.suite == "toy":
        command = [
            sys.executable,
            "-m",
            "distlearn",
            "toy",
            "--function",
            "all",
            "--optimizers",
            "all",
            "--out",
            str(Path(args.runs) / "toy"),
        ]
    elif args.suite == "comm":
        script = Path(__file__).resolve().parents[3] / "benchmarks" / "allreduce_busbw.py"
        if not script.is_file():
            raise ConfigError(
                "--suite comm runs benchmarks/allreduce_busbw.py from a source checkout of distlearn"
            )
        command = [sys.executable, str(script)]
    else:
        try:
            import distlearn.rl  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--suite rl needs distlearn.rl, which this installation does not have"
            ) from None
        command = [sys.executable, "-m", "distlearn", "rl", "bench"]
    return subprocess.run(command, check=False).returncode
