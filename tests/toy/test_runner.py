"""The runner: exact trajectories against hand-computed updates, determinism, counting, steps to tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from distlearn import optim
from distlearn.errors import ConfigError
from distlearn.toy.functions import TestFunction, get_function
from distlearn.toy.runner import (
    default_lr,
    optimizer_names,
    resolve_optimizers,
    run_optimizer,
    run_optimizers,
    steps_to_tolerance,
)
from distlearn.toy.tune import score, tune


def _isotropic() -> TestFunction:
    """f = (x^2 + y^2) / 2: gradient descent with lr = 1 lands on the minimum in one step."""
    return TestFunction(
        name="isotropic",
        formula="",
        function=lambda z: 0.5 * (z**2).sum(dim=-1),
        start=(1.5, -2.0),
        window=(-3, 3, -3, 3),
        minima=((0.0, 0.0),),
        minimum_value=0.0,
    )


def test_steps_to_tolerance_on_a_hand_made_trajectory():
    losses = [10.0, 3.0, 1.0, 0.5, 0.09, 0.2, 0.01]
    assert steps_to_tolerance(losses, 0.0, 0.1) == 4  # first t with f - f* <= 0.1, even if it goes back up
    assert steps_to_tolerance(losses, 0.0, 0.5) == 3  # "<=" counts equality
    assert steps_to_tolerance(losses, 0.0, 1e-3) is None
    assert steps_to_tolerance(losses, -1.0, 0.1) is None  # measured from f* = -1 every gap is >= 1
    assert steps_to_tolerance([x - 1.0 for x in losses], -1.0, 0.1) == 4  # shifted losses: same answer
    assert steps_to_tolerance([0.0], 0.0, 1e-9) == 0
    with pytest.raises(ConfigError):
        steps_to_tolerance(losses, 0.0, 0.0)


def test_sgd_trajectory_matches_the_hand_computed_update():
    """z_{t+1} = z_t - lr * A z_t on the ill-conditioned quadratic, computed here with A from the Hessian."""
    problem = get_function("quadratic")
    lr, steps = 0.01, 25
    run = run_optimizer(problem, "sgd", steps=steps, lr=lr)
    a = torch.autograd.functional.hessian(problem, torch.zeros(2, dtype=torch.float64))
    z = torch.tensor(problem.start, dtype=torch.float64)
    for t in range(steps + 1):
        torch.testing.assert_close(torch.tensor(run.points[t], dtype=torch.float64), z, rtol=0, atol=1e-12)
        assert run.losses[t] == pytest.approx(float(0.5 * z @ a @ z), rel=1e-12, abs=1e-15)
        z = z - lr * (a @ z)
    assert run.gradient_evaluations == list(range(steps + 1))
    assert not run.diverged


def test_momentum_trajectory_matches_heavy_ball_by_hand():
    """Heavy ball (torch.optim convention): v <- mu v + g, z <- z - lr v, on Rosenbrock's hand gradient."""
    problem = get_function("rosenbrock")
    lr, steps = 1e-4, 30
    probe = optim.create("momentum", [torch.zeros(2, requires_grad=True)], lr=lr)
    mu = probe.param_groups[0]["momentum"]  # the registry's default coefficient
    assert 0 < mu < 1
    run = run_optimizer(problem, "momentum", steps=steps, lr=lr)
    x, y = problem.start
    vx = vy = 0.0
    for t in range(1, steps + 1):
        gx, gy = -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)
        vx, vy = mu * vx + gx, mu * vy + gy
        x, y = x - lr * vx, y - lr * vy
        assert run.points[t] == pytest.approx([x, y], rel=1e-10, abs=1e-12)


def test_runs_are_deterministic_and_share_the_start():
    problem = get_function("beale")
    first = run_optimizers(problem, "all", steps=40)
    second = run_optimizers(problem, "all", steps=40)
    assert list(first) == optimizer_names()
    for name in first:
        assert first[name].points == second[name].points  # bit for bit
        assert first[name].losses == second[name].losses
        assert first[name].points[0] == list(problem.start)


def test_every_optimizer_makes_progress_with_its_tuned_lr():
    for name in ("rosenbrock", "quadratic"):
        problem = get_function(name)
        for optimizer, run in run_optimizers(problem, "all", steps=200).items():
            assert run.lr == default_lr(name, optimizer)
            assert not run.diverged, optimizer
            assert run.losses[-1] < run.losses[0], (name, optimizer)


def test_line_search_methods_count_every_closure_call():
    problem = get_function("rosenbrock")
    for optimizer in optimizer_names():
        run = run_optimizer(problem, optimizer, steps=10)
        increments = [
            b - a for a, b in zip(run.gradient_evaluations, run.gradient_evaluations[1:], strict=False)
        ]
        assert all(i >= 1 for i in increments), optimizer
        if not optimizer.startswith("cg"):
            assert set(increments) == {1}, optimizer


def test_divergence_stops_the_trajectory_at_the_last_finite_point():
    run = run_optimizer(get_function("quadratic"), "sgd", steps=5000, lr=1.0)  # lr * 50 > 2: unstable
    assert run.diverged
    assert run.steps < 5000
    assert all(math.isfinite(v) for v in run.losses)
    assert len(run.points) == len(run.losses) == len(run.gradient_evaluations)


def test_explicit_start_and_per_optimizer_lr():
    runs = run_optimizers(
        get_function("himmelblau"), "sgd,adam", steps=3, lr={"adam": 0.123}, start=(1.0, 1.0)
    )
    assert runs["adam"].lr == 0.123
    assert runs["sgd"].lr == default_lr("himmelblau", "sgd")
    assert runs["sgd"].points[0] == [1.0, 1.0]


def test_unknown_optimizer_names_the_known_ones():
    with pytest.raises(ConfigError) as error:
        resolve_optimizers("sgd,adamw")
    assert "'adamw'" in str(error.value)
    for name in optimizer_names():
        assert name in str(error.value)
    with pytest.raises(ConfigError):
        run_optimizer(get_function("beale"), "sgd", steps=3, lr=-1.0)


def test_tune_finds_the_one_step_learning_rate_on_an_isotropic_quadratic():
    """For f = |z|^2 / 2, gradient descent with lr = 1 reaches the minimum exactly in one step."""
    lr, best = tune(_isotropic(), "sgd", steps=50, tolerance=1e-10, grid=(0.1, 0.3, 1.0, 1.5, 3.0))
    assert lr == 1.0
    assert best == (0, 1)
    assert score([5.0, 1.0], 0.0, 0.1, diverged=True) > score([5.0, 2.0], 0.0, 0.1, diverged=False)
    # The tolerance must hold to the end: touching it at step 1 and leaving again does not count.
    assert score([5.0, 0.05, 3.0, 0.01, 0.02], 0.0, 0.1, diverged=False) == (0, 3)
    assert score([5.0, 0.05, 3.0], 0.0, 0.1, diverged=False) == (1, 3.0)


@pytest.mark.parametrize("name", ["cg-fr", "cg-hs"])
def test_closure_methods_are_stepped_with_a_closure_and_every_evaluation_counted(name, monkeypatch):
    """CG's line search through the runner: our count equals the optimizer's own count."""
    import distlearn.toy.runner as runner

    made = []
    create = optim.create

    def recording_create(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(optim, "create", recording_create)
    run = runner.run_optimizer(get_function("rosenbrock"), name, steps=6, lr=1.0)
    (optimizer,) = made
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert run.gradient_evaluations[-1] == state["func_evals"]
    assert run.gradient_evaluations[-1] > run.steps  # several evaluations per step
    assert run.losses[-1] < run.losses[0]
