"""Gradient evaluations of our nonlinear CG against scipy.optimize.minimize(method="CG") on Rosenbrock.

Claim (issue 3): to the same tolerance (max |g| <= 1e-5, scipy's default gtol) our CG needs no more
gradient evaluations than scipy's (Polak-Ribiere+ with a strong-Wolfe search) from each start. The same
comparison is a test (tests/optim/test_cg.py); this script prints the table for docs/optimizers.md.

    python benchmarks/cg_rosenbrock.py
"""

from __future__ import annotations

import sys

import numpy as np
import scipy.optimize
import torch

from distlearn import optim
from distlearn.tables import markdown_table

STARTS = [(-1.2, 1.0), (-1.5, 2.0), (0.0, 0.0), (2.0, 2.0), (-0.5, 1.5), (1.5, -1.0)]
GTOL = 1e-5


def rosenbrock(z):
    return (1 - z[0]) ** 2 + 100 * (z[1] - z[0] ** 2) ** 2


def value_and_grad(x):
    z = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = rosenbrock(z)
    loss.backward()
    return float(loss.detach()), z.grad.numpy().copy()


def ours(name: str, start) -> tuple[int, float]:
    z = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = optim.create(name, [z], max_iter=1000, max_eval=10_000, tolerance_grad=GTOL)
    count = 0

    def closure():
        nonlocal count
        count += 1
        opt.zero_grad()
        loss = rosenbrock(z)
        loss.backward()
        return loss

    opt.step(closure)
    return count, float(np.abs(z.detach().numpy() - 1).max())


def main() -> int:
    print(f"Rosenbrock, stop at max|g| <= {GTOL}: gradient evaluations (distance to (1, 1))")
    rows = []
    totals = {"scipy": 0, "cg-fr": 0, "cg-hs": 0}
    for start in STARTS:
        reference = scipy.optimize.minimize(
            value_and_grad, np.array(start), jac=True, method="CG", options={"gtol": GTOL}
        )
        cells = [f"{reference.njev} ({np.abs(reference.x - 1).max():.0e})"]
        totals["scipy"] += reference.njev
        for name in ("cg-fr", "cg-hs"):
            count, distance = ours(name, start)
            totals[name] += count
            cells.append(f"{count} ({distance:.0e})")
        rows.append([start, *cells])
    rows.append(["total", totals["scipy"], totals["cg-fr"], totals["cg-hs"]])
    print(markdown_table(["start", "scipy CG", "cg-fr", "cg-hs"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
