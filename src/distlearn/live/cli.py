"""``distlearn live``: a page on 127.0.0.1 that shows training runs as they happen.

Run manual::

    distlearn live                          # every run directory under runs/, new ones as they appear
    distlearn live runs/sync runs/ps        # these runs (directories written by distlearn train --out)
    distlearn live --demo                   # train sync, ps, hogwild on Fashion-MNIST side by side
    distlearn live --demo --strategies single,sync --steps 200 --port 8765

The page has two views: the runs (loss and accuracy per run, samples/s, bytes sent, staleness of async
runs, a per-rank activity timeline) and the toy problems (optimizer paths drawn step by step on the contour
plot). Ctrl-C stops the server and, with ``--demo``, every process the demo started; closing the page stops
nothing (the demo's runs end at their last step, or at Ctrl-C). See docs/live.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
import webbrowser
from pathlib import Path

from distlearn.errors import ConfigError, require_extra

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distlearn live`` options."""
    parser.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="run directories (or metrics.jsonl files) to show; default: every run under --root",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="train sync, ps and hogwild on Fashion-MNIST side by side and show them",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 (default 0: any free port)"
    )
    parser.add_argument(
        "--root",
        default="runs",
        help="without RUN_DIRs: show every run directory under this one (default: runs)",
    )
    parser.add_argument("--open", action="store_true", help="open the page in the default web browser")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.25,
        help="seconds over which changes of the metrics files are gathered before the page gets them "
        "(default 0.25)",
    )
    demo = parser.add_argument_group("--demo")
    demo.add_argument(
        "--strategies",
        default="default",
        help="comma-separated strategies to run, or all (default: sync, ps and hogwild, those registered)",
    )
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    demo.add_argument("--model", default="mlp", help="model of every run (default mlp)")
    demo.add_argument(
        "--out",
        default=None,
        help="parent directory of the demo's runs (default: runs/live-demo-<date>-<time>)",
    )


def run(args: argparse.Namespace) -> int:
    for module in ("starlette", "uvicorn", "anyio", "contourpy", "psutil", "watchfiles"):
        require_extra(module, "live", "distlearn live")
    from distlearn.live.demo import DemoBudget, DemoLauncher, demo_strategies
    from distlearn.live.server import LiveServer

    logging.basicConfig(level=logging.INFO, format="distlearn live: %(message)s")
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    if args.demo and args.run_dirs:
        raise ConfigError("pass either --demo or RUN_DIRs, not both (the demo shows its own runs)")
    launcher = None
    if args.demo:
        out = Path(args.out or f"runs/live-demo-{time.strftime('%Y%m%d-%H%M%S')}")
        budget = DemoBudget(steps=args.steps, model=args.model)
        launcher = DemoLauncher(out, demo_strategies(args.strategies), budget)
        server = LiveServer(demo=launcher, port=args.port, poll_interval=args.poll)
    elif args.run_dirs:
        server = LiveServer(args.run_dirs, port=args.port, poll_interval=args.poll)
    else:
        server = LiveServer(discover_root=args.root, port=args.port, poll_interval=args.poll)
    try:
        if launcher is not None:
            launcher.start()
            names = ", ".join(name for name, _ in launcher.runs())
            print(f"distlearn live: demo runs ({names}) in {launcher.out}", flush=True)
        print(f"distlearn live: open {server.url}  (Ctrl-C stops)", flush=True)
        if args.open:
            webbrowser.open(server.url)
        # uvicorn stops on SIGINT and SIGTERM; a closed terminal (SIGHUP) must stop the demo's runs too
        signal.signal(signal.SIGHUP, server.server.handle_exit)
        server.serve()
    finally:
        if launcher is not None:
            print("distlearn live: stopping the demo's runs", flush=True)
            launcher.stop()
    return 0
