"""The cost model's projection of flat and hierarchical allreduces of one 25 MB bucket to many machines.

Reads the loopback fit (alpha, gamma) of ``benchmarks/cost_model_fit.py`` and puts a 25 MB allreduce through
:func:`distlearn.comm.cost_model.project` for R = 8, 32, 256 on assumed 10 and 100 Gb/s links: the flat ring
and Rabenseifner against the hierarchical reducer (shm within a host of L ranks on the memory network, the
inner reducer across hosts). A projection from a model, not a measurement.

    python benchmarks/hierarchical_projection.py
        [--fit benchmarks/results/cost_model_fit-2026-11-30-quiet.json]
        [--out benchmarks/results/hierarchical_projection]

Writes ``OUT.json`` (the numbers, the inputs, the command) and ``OUT.md`` (the table docs/sync-reducers.md
shows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distlearn.comm.cost_model import link, project
from distlearn.tables import markdown_table

NBYTES = 25e6
RANKS = (8, 32, 256)
ROWS = (  # fmt: skip -- label, algorithm, link Gb/s, local size L, inner
    ("ring, 10 Gb/s", "ring", 10, 1, "ring"),
    ("Rabenseifner, 10 Gb/s", "rabenseifner", 10, 1, "ring"),
    ("hierarchical, L = 2 (this machine's R = 2 per host), ring across, 10 Gb/s",
     "hierarchical", 10, 2, "ring"),
    ("hierarchical, L = 8, ring across, 10 Gb/s", "hierarchical", 10, 8, "ring"),
    ("ring, 100 Gb/s", "ring", 100, 1, "ring"),
    ("Rabenseifner, 100 Gb/s", "rabenseifner", 100, 1, "ring"),
    ("hierarchical, L = 8, ring across, 100 Gb/s", "hierarchical", 100, 8, "ring"),
    ("hierarchical, L = 8, Rabenseifner across, 100 Gb/s", "hierarchical", 100, 8, "rabenseifner"),
)


def rows(alpha: float, gamma: float) -> list[dict[str, object]]:
    out = []
    for label, algorithm, gbps, local, inner in ROWS:
        network = link(gbps, alpha=alpha, gamma=gamma)
        ms = [
            1e3 * project(algorithm, p, NBYTES, network, local_size=local, inner=inner) for p in RANKS
        ]
        out.append({"label": label, "algorithm": algorithm, "gbps": gbps, "local_size": local,
                    "inner": inner, "ms": ms})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", default="benchmarks/results/cost_model_fit-2026-11-30-quiet.json")
    parser.add_argument("--out", default="benchmarks/results/hierarchical_projection")
    args = parser.parse_args(argv)
    fit = json.loads(Path(args.fit).read_text())
    alpha, gamma = fit["p2p_alpha_s"], fit["gamma_s_per_byte"]
    table = rows(alpha, gamma)
    header = ["projected ms, 25 MB bucket", *(f"R = {p}" if i == 0 else str(p) for i, p in enumerate(RANKS))]
    body = [[r["label"], *(f"{ms:.1f}" for ms in r["ms"])] for r in table]  # type: ignore[union-attr]
    markdown = markdown_table(header, body)
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/hierarchical_projection.py " + " ".join(given)
    record = {"benchmark": "hierarchical_projection", "command": command.strip(), "fit": args.fit,
              "alpha_s": alpha, "gamma_s_per_byte": gamma, "nbytes": NBYTES, "ranks": list(RANKS),
              "rows": table}  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
