"""Nonlinear CG: finite termination on quadratics, and gradient evaluations against scipy on Rosenbrock."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from distlearn import optim


def quadratic(n: int, seed: int, condition: float = 100.0):
    """A strictly convex f(x) = x'Ax/2 - b'x with eigenvalues spread over [1, condition]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, np.log10(condition), n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    return a, b, torch.linalg.solve(a, b)


@pytest.mark.parametrize("name", ["cg-fr", "cg-hs"])
# In floating point CG loses conjugacy gradually (Greenbaum & Strakos, 1992): textbook CG in float64 on
# 16 log-spaced eigenvalues over [1, 100] is still 4e-4 away after 16 steps, so the larger n uses a
# smaller condition number. Exact arithmetic needs neither restriction.
@pytest.mark.parametrize(
    ("n", "seed", "condition"), [(2, 0, 100.0), (5, 1, 100.0), (12, 2, 100.0), (30, 3, 10.0)]
)
@pytest.mark.parametrize("restart_every", [None, "n"])
def test_exact_line_search_minimises_a_quadratic_in_n_steps(name, n, seed, condition, restart_every):
    a, b, solution = quadratic(n, seed, condition)
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = optim.create(name, [x], line_search="exact", restart_every=n if restart_every else None)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    for _ in range(n):
        opt.step(closure)
    assert float((x.detach() - solution).abs().max()) <= 1e-6
    # One step short of n is not enough in general: CG's finite termination is tight for spread spectra.
    if n >= 5 and condition >= 100:
        y = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        short = optim.create(name, [y], line_search="exact")

        def closure_y():
            short.zero_grad()
            loss = 0.5 * y @ a @ y - b @ y
            loss.backward()
            return loss

        for _ in range(n - 2):
            short.step(closure_y)
        assert float((y.detach() - solution).abs().max()) > 1e-6


def rosenbrock(z):
    return (1 - z[0]) ** 2 + 100 * (z[1] - z[0] ** 2) ** 2


STARTS = [(-1.2, 1.0), (-1.5, 2.0), (0.0, 0.0), (2.0, 2.0), (-0.5, 1.5), (1.5, -1.0)]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("name", ["cg-fr", "cg-hs"])
def test_rosenbrock_needs_no_more_gradient_evaluations_than_scipy(name, start):
    gtol = 1e-5  # scipy's default: stop when max |g| <= gtol

    def value_and_grad(x):
        z = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        loss = rosenbrock(z)
        loss.backward()
        return float(loss.detach()), z.grad.numpy().copy()

    reference = scipy.optimize.minimize(
        value_and_grad, np.array(start), jac=True, method="CG", options={"gtol": gtol}
    )
    assert reference.success and np.allclose(reference.x, 1.0, atol=1e-4)

    z = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = optim.create(name, [z], max_iter=1000, max_eval=10_000, tolerance_grad=gtol)
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        loss = rosenbrock(z)
        loss.backward()
        return loss

    opt.step(closure)
    _, gradient = value_and_grad(z.detach().numpy())
    assert np.abs(gradient).max() <= gtol
    assert torch.allclose(z.detach(), torch.ones(2, dtype=torch.float64), atol=1e-4)
    assert evaluations <= reference.njev, f"{name} from {start}: {evaluations} vs scipy's {reference.njev}"


def test_fixed_step_cg_trains_without_a_closure():
    """line_search=None: a minibatch-style step from .grad; it must decrease a quadratic steadily."""
    a, b, solution = quadratic(10, 4, condition=10.0)
    x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = optim.create("cg-hs", [x], line_search=None, lr=0.05, restart_every=10)
    for _ in range(300):
        opt.zero_grad()
        (0.5 * x @ a @ x - b @ x).backward()
        opt.step()
    assert float((x.detach() - solution).abs().max()) < 1e-3


def test_cg_takes_one_param_group():
    with pytest.raises(ValueError, match="one parameter group"):
        optim.create(
            "cg-fr", [{"params": [torch.zeros(1, requires_grad=True)]}, {"params": [torch.zeros(1)]}]
        )
