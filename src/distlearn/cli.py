"""``distlearn``: the command line.

Each subcommand lives in its own module, which provides either ``command(argv) -> int`` (it parses its own
arguments: ``train``, whose flags tyro generates from the config dataclasses) or ``add_arguments(parser)``
and ``run(args) -> int``. Only the chosen subcommand's module is imported, so ``distlearn --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distlearn import __version__
from distlearn.errors import DistlearnError

__all__ = ["main", "COMMANDS"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("distlearn.toy.cli", "optimizers on 2-D test functions: contour plot, GIF, steps table"),
    "train": ("distlearn.train_cli", "train a model with one strategy: metrics, checkpoints, summary"),
    "plot": ("distlearn.plot_cli", "loss and accuracy curves of several runs against steps and wall time"),
    "rl": ("distlearn.rl.cli", "distributed RL: naive, a3c, gorila, sync-pg, play"),
    "bench": ("distlearn.bench.cli", "every strategy on the same work: one table, one plot, raw JSON"),
    "async-momentum": ("distlearn.async_momentum", "implicit momentum of M async workers on a quadratic"),
    "live": ("distlearn.live.cli", "a page on 127.0.0.1 showing runs as they train; --demo starts some"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distlearn",
        description="Distributed deep learning on PyTorch: every strategy behind one API.",
    )
    parser.add_argument("--version", action="version", version=f"distlearn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS and argv[0] == command:
        module = importlib.import_module(COMMANDS[command][0])
        if hasattr(module, "command"):  # the subcommand parses its own arguments
            return int(module.command(argv[1:]) or 0)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except DistlearnError as error:
        print(f"distlearn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distlearn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
