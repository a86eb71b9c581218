"""The fidelity table of docs/fidelity.md, rendered from benchmarks/results/fidelity.json and result files.

Each row of ``fidelity.json`` is one paper's headline claim: ``paper``, ``claim``, ``setting``, ``verdict``,
``result_files`` (names under benchmarks/results/) and the figure, either read from a result file by this
script or written out as text with its number of seeds:

* ``{"compression": {"file": F, "label": L}}``: the codec's accuracy lost against dense, paired by seed
  (mean ± std over the file's seeds) and its compression ratio, from F's ``summary``;
* ``{"rl": {"file": F, "algorithm": A}}``: train-to-solved seconds per worker count, from F's ``rows``;
* ``{"text": "...", "seeds": N}``: a figure quoted from a page (N = 0 where nothing was measured yet).

A figure from fewer than 3 seeds is marked "N seed(s) -- to rerun". Update a row by editing the JSON (or
the result file it reads), then::

    python benchmarks/fidelity.py --write     # rewrites the table between the markers in docs/fidelity.md

``tests/test_evidence.py`` checks that the page holds exactly what this renders and that every named file
exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLAIMS = RESULTS / "fidelity.json"
PAGE = ROOT / "docs" / "fidelity.md"
BEGIN, END = "<!-- fidelity-table:begin -->", "<!-- fidelity-table:end -->"
HEADER = ["paper", "its claim", "our setting", "our figure (mean ± std, seeds)", "verdict", "result file"]


def _compression(spec: dict) -> tuple[str, int]:
    summary = json.loads((RESULTS / spec["file"]).read_text())["summary"]
    row = next(r for r in summary if r["label"] == spec["label"])
    seeds = len(row["seeds"])
    text = (
        f"{row['accuracy_lost_points']:.2f} ± {row['lost_std']:.2f} points lost at {row['ratio']:.1f}x "
        f"({row['accuracy_mean']:.2f}% final), {seeds} seeds"
    )
    return text, seeds


def _rl(spec: dict) -> tuple[str, int]:
    rows = [r for r in json.loads((RESULTS / spec["file"]).read_text())["rows"]]
    rows = [r for r in rows if r["algorithm"] == spec["algorithm"]]
    seeds = min(int(r["solved"].split("/")[1]) for r in rows)
    parts = [f"R = {r['workers']}: {r['train_to_solved_s']} s ({r['solved']} solved)" for r in rows]
    return "train to solved " + "; ".join(parts) + f", {seeds} seeds", seeds


def figure(row: dict) -> str:
    if "compression" in row:
        text, seeds = _compression(row["compression"])
    elif "rl" in row:
        text, seeds = _rl(row["rl"])
    else:
        text, seeds = row["text"], row["seeds"]
    if seeds == 0:
        return f"{text} -- not measured yet"
    if seeds < 3:
        return f"{text} ({seeds} seed{'s' if seeds > 1 else ''} -- to rerun)"
    return text


def render(claims: dict) -> str:
    """The table's Markdown (rows in the JSON's order)."""
    sys.path.insert(0, str(ROOT / "src"))
    from distlearn.tables import markdown_table

    cells = [
        [
            row["paper"],
            row["claim"],
            row["setting"],
            figure(row),
            row["verdict"],
            ", ".join(f"`{name}`" for name in row["result_files"]) or "none yet",
        ]
        for row in claims["rows"]
    ]
    return markdown_table(HEADER, cells)


def write(page: Path = PAGE) -> None:
    text = page.read_text()
    table = render(json.loads(CLAIMS.read_text()))
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no {BEGIN} ... {END} block to rewrite")
    page.write_text(pattern.sub(lambda _: f"{BEGIN}\n\n{table}\n\n{END}", text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/fidelity.md")
    args = parser.parse_args()
    if args.write:
        write()
    else:
        print(render(json.loads(CLAIMS.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
