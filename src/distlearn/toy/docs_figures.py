"""Regenerate the toy pictures and tables in docs/toy-problems.md from one command.

Run manual (from the repository root; about a minute)::

    python -m distlearn.toy.docs_figures

It runs ``distlearn toy --function all --optimizers all`` (default steps, tolerance and tuned learning
rates) into a scratch directory, copies each ``<function>.png`` / ``.gif`` to ``docs/img/toy-<function>.*``
and rewrites the block between ``<!-- toy-table:begin -->`` and ``<!-- toy-table:end -->`` in the doc
with the measured steps table, so the page's numbers always come from this command.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

from distlearn import optim
from distlearn.errors import ConfigError
from distlearn.tables import markdown_table as _markdown_table
from distlearn.toy.config import ToyConfig
from distlearn.toy.experiment import ProblemResult, run_toy

__all__ = ["markdown_table", "main"]

BEGIN, END = "<!-- toy-table:begin -->", "<!-- toy-table:end -->"
COMMAND = "python -m distlearn.toy.docs_figures"


def markdown_table(results: list[ProblemResult], tolerance: float) -> str:
    """One markdown table: a row per problem, a column per optimizer, "steps (gradient evaluations)"."""
    optimizers = [row.optimizer for row in results[0].rows]
    body: list[list[str]] = []
    for result in results:
        cells = []
        for row in result.rows:
            if row.steps_to_tolerance is None:
                gap = (
                    "diverged" if row.diverged or not math.isfinite(row.final_gap) else f"{row.final_gap:.1e}"
                )
                cells.append(f"— ({gap})")
            elif row.evaluations_to_tolerance != row.steps_to_tolerance:
                cells.append(f"{row.steps_to_tolerance} ({row.evaluations_to_tolerance} ev.)")
            else:
                cells.append(str(row.steps_to_tolerance))
        body.append([result.problem, *cells])
    return _markdown_table(["problem", *optimizers], body, align="l" + "r" * len(optimizers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="docs", help="the docs directory (default: %(default)s)")
    args = parser.parse_args(argv)
    docs = Path(args.docs)
    page = docs / "toy-problems.md"
    if not page.is_file():
        raise ConfigError(f"{page} does not exist; run from the repository root or pass --docs DIR")
    config = ToyConfig(function="all", optimizers="all")
    with tempfile.TemporaryDirectory() as scratch:
        results = run_toy(ToyConfig(**{**config.__dict__, "out": scratch}))
        (docs / "img").mkdir(exist_ok=True)
        for result in results:
            for suffix in (".png", ".gif"):
                shutil.copyfile(
                    Path(scratch) / f"{result.problem}{suffix}",
                    docs / "img" / f"toy-{result.problem}{suffix}",
                )
    table = markdown_table(results, config.tolerance)
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise ConfigError(f"{page} lacks the {BEGIN} ... {END} markers; add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = (
        f"{BEGIN}\n\nSteps to reach f - f* <= {config.tolerance:g} from the standard start in at most "
        f"{config.steps} steps; "
        '"— (g)" means not reached, with the final f - f* = g; for line-search methods the gradient '
        f"evaluations follow in brackets. Optimizers from `{optim.__name__}`, learning rates from "
        f"`distlearn.toy.tuned`. Made by `{COMMAND}`.\n\n{table}\n\n{END}"
    )
    page.write_text(head + block + tail)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
