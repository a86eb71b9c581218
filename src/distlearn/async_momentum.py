"""Asynchrony begets momentum: the implicit momentum of M asynchronous workers, measured on a quadratic.

Mitliagkas, Zhang, Hadjis & Re (2016), "Asynchrony begets momentum, with an application to deep learning".
``M`` workers each read the shared weights, compute a gradient, and write it back; if their compute times are
memoryless (exponential), the worker that writes next is any of the ``M`` with probability ``q = 1 / M``,
so the staleness ``tau`` of an update is geometric, ``P(tau = k) = q (1 - q)^k``. Then the expected update
of asynchronous SGD with rate ``eta`` obeys ::

    E[w_{t+1} - w_t] = (1 - 1/M) * E[w_t - w_{t-1}] - (eta / M) * grad f(E[w_t])     (f quadratic)

which is heavy-ball momentum ``mu = 1 - 1/M`` at the rate ``eta / M``: asynchrony adds momentum.

The simulation here is exact, not an approximation: ``M`` simulated workers each hold the parameters they
last read (the "queue of past parameters"); at each update one worker, chosen uniformly at random, applies
the gradient at its snapshot to the current weights (with explicit momentum ``mu_e`` if asked:
``v <- mu_e * v - eta * g``, ``w <- w + v``) and reads the new weights. ``N`` independent runs are simulated
at once (vectorised), so on this 2-core machine any ``M`` costs the same as ``M = 1``.

Fitting the effective momentum: on the mean trajectory ``m_t`` over the ``N`` runs, least squares of ::

    m_{t+1} - m_t = mu * (m_t - m_{t-1}) - eta_eff * H m_t          (two unknowns, all t and coordinates)

gives ``mu`` (the paper's prediction: ``1 - 1/M``) and ``eta_eff`` (``eta / M``).

Momentum compensation (the paper's section 4): the explicit momentum that keeps implicit plus explicit at a
target ``mu*`` is ``mu_e = mu* - (1 - 1/M)``, negative when ``M`` is large. We run it and report the fitted
total momentum and the loss curves beside synchronous SGD with explicit momentum ``mu*``.

Real processes (:func:`real_async`, ``--real-runs N``): ``M`` operating-system processes share the
weights in shared memory and really race. Each reads the weights (with the version it read), computes the
gradient, waits an exponentially distributed "compute time" (so that the next writer is any of the ``M``,
the paper's assumption), and applies its update; a lock makes each read and each write atomic (the
paper's model: stale, never torn), nothing orders the workers. Every update's staleness is *measured*
(versions written since the writer read). ``N`` such runs, one after another on the same processes, give
the mean trajectory that is fitted as above.

Run it::

    distlearn async-momentum --workers 1 2 4 8 16 --out benchmarks/results/async_momentum.json \\
        --plot docs/img/async-momentum.png
    distlearn async-momentum --workers 2 --real-runs 400 --out benchmarks/results/async_momentum_real.json
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distlearn.errors import ConfigError, require_extra
from distlearn.pool import ProcessPool, spawn_context

__all__ = [
    "MomentumFit",
    "add_arguments",
    "compensated_momentum",
    "fit_momentum",
    "measure_real",
    "real_async",
    "run",
    "simulate_async",
    "simulate_sync_momentum",
]

CURVATURES = (1.0, 0.1)
"""Diagonal of the quadratic's Hessian ``H``: condition number 10, so momentum matters."""
START = (1.0, 1.0)


@dataclass
class MomentumFit:
    """The fitted update model ``m_{t+1} - m_t = mu (m_t - m_{t-1}) - eta_eff H m_t``."""

    workers: int
    explicit_momentum: float
    momentum: float
    effective_lr: float
    predicted_momentum: float
    residual: float


def _hessian(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(CURVATURES, dtype=dtype)


def simulate_async(
    workers: int,
    *,
    lr: float,
    steps: int,
    runs: int = 20000,
    explicit_momentum: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Exact asynchronous SGD with ``workers`` memoryless workers on ``f(w) = 1/2 w^T H w``.

    Returns the weights of every run after every update, shape ``(steps + 1, runs, d)`` (float64).
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if lr <= 0 or steps < 2 or runs < 1:
        raise ConfigError("need lr > 0, steps >= 2 and runs >= 1")
    if not -1 < explicit_momentum < 1:
        raise ConfigError(f"explicit momentum must be in (-1, 1), got {explicit_momentum}")
    generator = torch.Generator().manual_seed(seed)
    hessian = _hessian()
    w = torch.tensor(START, dtype=torch.float64).expand(runs, -1).clone()  # (runs, d)
    velocity = torch.zeros_like(w)
    snapshots = w.unsqueeze(1).expand(-1, workers, -1).clone()  # (runs, workers, d): what each worker read
    rows = torch.arange(runs)
    history = [w.clone()]
    for _ in range(steps):
        writer = torch.randint(workers, (runs,), generator=generator)  # who finishes next: uniform
        gradient = snapshots[rows, writer] * hessian  # grad f at the parameters that worker read
        velocity = explicit_momentum * velocity - lr * gradient
        w = w + velocity
        snapshots[rows, writer] = w  # it reads the new weights and starts its next gradient
        history.append(w.clone())
    return torch.stack(history)


def simulate_sync_momentum(*, lr: float, momentum: float, steps: int) -> torch.Tensor:
    """Synchronous heavy-ball SGD on the same quadratic: ``(steps + 1, d)`` weights."""
    hessian = _hessian()
    w = torch.tensor(START, dtype=torch.float64)
    velocity = torch.zeros_like(w)
    history = [w.clone()]
    for _ in range(steps):
        velocity = momentum * velocity - lr * hessian * w
        w = w + velocity
        history.append(w.clone())
    return torch.stack(history)


def fit_momentum(mean_trajectory: torch.Tensor) -> tuple[float, float, float]:
    """Least-squares ``(mu, eta_eff, relative residual)`` of the update model on a ``(T+1, d)`` path."""
    m = mean_trajectory.double()
    delta = m[1:] - m[:-1]  # (T, d): delta[t] = m_{t+1} - m_t
    target = delta[1:].reshape(-1)  # m_{t+1} - m_t for t >= 1
    previous = delta[:-1].reshape(-1)  # m_t - m_{t-1}
    gradient = (m[1:-1] * _hessian()).reshape(-1)  # H m_t
    design = torch.stack([previous, -gradient], dim=1)
    solution = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
    residual = float((design @ solution - target).norm() / target.norm().clamp_min(1e-300))
    return float(solution[0]), float(solution[1]), residual


def compensated_momentum(target: float, workers: int) -> float:
    """Explicit momentum ``mu* - (1 - 1/M)`` that keeps implicit plus explicit momentum at ``target``."""
    return target - (1.0 - 1.0 / workers)


def measure(
    workers: int, *, lr: float, steps: int, runs: int, explicit_momentum: float = 0.0, seed: int = 0
) -> tuple[MomentumFit, torch.Tensor]:
    """Simulate, fit, and return the fit and the mean trajectory."""
    trajectory = simulate_async(
        workers, lr=lr, steps=steps, runs=runs, explicit_momentum=explicit_momentum, seed=seed
    )
    mean = trajectory.mean(dim=1)
    momentum, effective_lr, residual = fit_momentum(mean)
    fit = MomentumFit(
        workers=workers,
        explicit_momentum=explicit_momentum,
        momentum=momentum,
        effective_lr=effective_lr,
        predicted_momentum=1.0 - 1.0 / workers,
        residual=residual,
    )
    return fit, trajectory


def _real_worker(
    index: int, weights, log, staleness, counter, lock, start, done, lr: float, steps: int, runs: int,
    mean_compute_s: float, seed: int, timeout_s: float,
) -> None:  # fmt: skip
    """One real asynchronous worker (a process): read, compute, wait Exp(mean), write; for every run."""
    generator = random.Random(seed * 1000 + index)
    hessian = _hessian()
    for run in range(runs):
        start.wait(timeout_s)  # the main process has reset the weights for this run
        while True:
            with lock:
                snapshot, read_version = weights.clone(), counter.value
            if read_version >= steps:
                break
            gradient = hessian * snapshot
            time.sleep(generator.expovariate(1.0 / mean_compute_s))
            with lock:
                version = counter.value
                if version >= steps:
                    break
                weights.sub_(lr * gradient)
                log[run, version + 1] = weights
                staleness[run, version] = version - read_version
                counter.value = version + 1
        done.wait(timeout_s)


def real_async(
    workers: int,
    *,
    lr: float,
    steps: int,
    runs: int,
    mean_compute_s: float = 1e-3,
    seed: int = 0,
    timeout_s: float = 60.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``runs`` asynchronous SGD runs on the quadratic by ``workers`` real processes (module docstring).

    Returns the trajectories ``(steps + 1, runs, d)`` and the measured staleness of every update
    ``(runs, steps)``. The processes are a :class:`distlearn.pool.ProcessPool`: each barrier wait has
    ``timeout_s``, a worker that raises ends the call with its error (:class:`distlearn.pool.WorkerError`),
    and no process outlives it (stopped on an error, SIGTERM or Ctrl-C).
    """
    if workers < 1 or steps < 2 or runs < 1 or lr <= 0 or mean_compute_s <= 0:
        raise ConfigError("real_async needs workers >= 1, steps >= 2, runs >= 1, lr > 0, mean_compute_s > 0")
    context = spawn_context()
    weights = torch.tensor(START, dtype=torch.float64).share_memory_()
    log = torch.zeros(runs, steps + 1, len(START), dtype=torch.float64).share_memory_()
    staleness = torch.zeros(runs, steps, dtype=torch.int64).share_memory_()
    counter, lock = context.Value("i", 0, lock=False), context.Lock()
    start, done = context.Barrier(workers + 1), context.Barrier(workers + 1)
    arguments = (weights, log, staleness, counter, lock, start, done, lr, steps, runs, mean_compute_s, seed,
                 timeout_s)  # fmt: skip
    with ProcessPool(_real_worker, workers, arguments, name="async-momentum") as pool:
        try:
            for run in range(runs):
                with lock:
                    weights.copy_(torch.tensor(START, dtype=torch.float64))
                    counter.value = 0
                log[run, 0] = weights
                start.wait(timeout_s)
                done.wait(timeout_s)
        except threading.BrokenBarrierError as error:  # a worker died or hung
            pool.poll()  # one that raised: WorkerError, naming it, with its traceback
            raise ConfigError(
                f"async-momentum: a real worker process failed or timed out ({error!r})"
            ) from error
        pool.wait(timeout_s)
    return log.transpose(0, 1).clone(), staleness.clone()


def measure_real(
    workers: int, *, lr: float, steps: int, runs: int, mean_compute_s: float = 1e-3, seed: int = 0
) -> tuple[MomentumFit, torch.Tensor, torch.Tensor]:
    """:func:`real_async`, then the fit of its mean trajectory; also returns trajectories and staleness."""
    trajectory, staleness = real_async(
        workers, lr=lr, steps=steps, runs=runs, mean_compute_s=mean_compute_s, seed=seed
    )
    momentum, effective_lr, residual = fit_momentum(trajectory.mean(dim=1))
    fit = MomentumFit(
        workers=workers,
        explicit_momentum=0.0,
        momentum=momentum,
        effective_lr=effective_lr,
        predicted_momentum=1.0 - 1.0 / workers,
        residual=residual,
    )
    return fit, trajectory, staleness


def _loss(trajectory: torch.Tensor) -> torch.Tensor:
    """``f(w) = 1/2 sum_i h_i w_i^2`` of each row (the last dimension is the coordinate)."""
    return 0.5 * (trajectory**2 * _hessian()).sum(dim=-1)


# -- command line -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="values of M")
    parser.add_argument("--lr", type=float, default=0.5, help="each worker's learning rate eta")
    parser.add_argument("--steps", type=int, default=200, help="updates simulated per run")
    parser.add_argument("--runs", type=int, default=20000, help="independent runs averaged for the fit")
    parser.add_argument("--target-momentum", type=float, default=0.9, help="mu* for momentum compensation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the fits and loss curves")
    parser.add_argument("--plot", default=None, help="PNG file for the loss curves")
    parser.add_argument(
        "--real-runs", type=int, default=0,
        help="also measure with M real processes (shared memory, measured staleness) over this many runs",
    )  # fmt: skip
    parser.add_argument(
        "--real-steps", type=int, default=60, help="updates per real run (each waits ~1 ms of 'compute')"
    )


def run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {
        "command": "distlearn async-momentum "
        + " ".join(
            [
                f"--workers {' '.join(map(str, args.workers))}",
                f"--lr {args.lr:g}",
                f"--steps {args.steps}",
                f"--runs {args.runs}",
                f"--target-momentum {args.target_momentum:g}",
                f"--seed {args.seed}",
            ]
        ),  # fmt: skip
        "curvatures": list(CURVATURES),
        "torch": str(torch.__version__),
        "fits": [],
        "compensated": [],
        "curves": {},
    }
    print(f"{'M':>3} {'fitted mu':>10} {'1 - 1/M':>8} {'fitted eta':>11} {'eta / M':>8}")
    for workers in args.workers:
        fit, trajectory = measure(workers, lr=args.lr, steps=args.steps, runs=args.runs, seed=args.seed)
        results["fits"].append(asdict(fit))
        print(f"{workers:>3} {fit.momentum:>10.4f} {fit.predicted_momentum:>8.4f} "
              f"{fit.effective_lr:>11.4f} {args.lr / workers:>8.4f}")  # fmt: skip
        sync = simulate_sync_momentum(lr=args.lr / workers, momentum=1 - 1 / workers, steps=args.steps)
        curves = {
            "async_mean_loss": _loss(trajectory).mean(dim=1).tolist(),
            "sync_momentum_loss": _loss(sync).tolist(),
        }
        if workers > 1:
            explicit = compensated_momentum(args.target_momentum, workers)
            compensated, comp_trajectory = measure(
                workers, lr=args.lr, steps=args.steps, runs=args.runs, explicit_momentum=explicit,
                seed=args.seed,
            )  # fmt: skip
            naive, naive_trajectory = measure(
                workers, lr=args.lr, steps=args.steps, runs=args.runs,
                explicit_momentum=args.target_momentum, seed=args.seed,
            )  # fmt: skip
            results["compensated"].append(
                {"workers": workers, "explicit": explicit, "fitted_total": compensated.momentum,
                 "naive_explicit": args.target_momentum, "naive_fitted_total": naive.momentum}
            )  # fmt: skip
            curves["async_compensated_loss"] = _loss(comp_trajectory).mean(dim=1).tolist()
            curves["async_naive_momentum_loss"] = _loss(naive_trajectory).mean(dim=1).tolist()
            target_sync = simulate_sync_momentum(lr=args.lr, momentum=args.target_momentum, steps=args.steps)
            curves["sync_target_momentum_loss"] = _loss(target_sync).tolist()
        results["curves"][str(workers)] = curves
    if args.real_runs:
        results["real"] = []
        print(f"real processes, {args.real_runs} runs of {args.real_steps} updates:")
        print(f"{'M':>3} {'fitted mu':>10} {'simulated':>10} {'1 - 1/M':>8} {'mean staleness':>15}")
        for workers in args.workers:
            fit, trajectory, staleness = measure_real(
                workers, lr=args.lr, steps=args.real_steps, runs=args.real_runs, seed=args.seed
            )
            simulated, _ = measure(workers, lr=args.lr, steps=args.real_steps, runs=args.runs, seed=args.seed)
            counts = torch.bincount(staleness.reshape(-1)).tolist()
            results["real"].append(
                {**asdict(fit), "simulated_momentum": simulated.momentum, "runs": args.real_runs,
                 "steps": args.real_steps, "mean_staleness": float(staleness.double().mean()),
                 "staleness_counts": counts, "mean_loss": _loss(trajectory).mean(dim=1).tolist()}
            )  # fmt: skip
            print(f"{workers:>3} {fit.momentum:>10.4f} {simulated.momentum:>10.4f} "
                  f"{fit.predicted_momentum:>8.4f} {float(staleness.double().mean()):>15.3f}")  # fmt: skip
        results["command"] += f" --real-runs {args.real_runs} --real-steps {args.real_steps}"
    for entry in results["compensated"]:
        print(f"M={entry['workers']}: explicit {entry['explicit']:+.3f} -> fitted total "
              f"{entry['fitted_total']:.3f} (naive explicit {entry['naive_explicit']:.2f} -> "
              f"{entry['naive_fitted_total']:.3f})")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plot:
        _plot(results, Path(args.plot))
    return 0


def _plot(results: dict[str, Any], path: Path) -> None:
    matplotlib = require_extra("matplotlib", "plot", "distlearn async-momentum --plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in results["curves"] if m != "1"][:4]
    figure, axes = plt.subplots(1, len(shown) + 1, figsize=(4 * (len(shown) + 1), 3.6))
    fits = results["fits"]
    axes[0].plot([f["workers"] for f in fits], [f["momentum"] for f in fits], "o", label="fitted")
    grid = [1 + i * 0.25 for i in range(int(4 * (max(f["workers"] for f in fits) - 1)) + 1)]
    axes[0].plot(grid, [1 - 1 / m for m in grid], "-", label="1 - 1/M")
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="workers M", ylabel="implicit momentum", title="asynchrony begets momentum")
    axes[0].legend()
    labels = {
        "async_mean_loss": "async, no explicit momentum",
        "sync_momentum_loss": "sync, momentum 1-1/M, lr/M",
        "async_naive_momentum_loss": "async + explicit mu*",
        "async_compensated_loss": "async + compensated mu*-(1-1/M)",
        "sync_target_momentum_loss": "sync, momentum mu*",
    }
    for axis, workers in zip(axes[1:], shown, strict=False):
        for key, label in labels.items():
            curve = results["curves"][workers].get(key)
            if curve is not None:
                axis.plot([max(v, 1e-30) for v in curve], label=label, lw=1.2)
        axis.set_yscale("log")
        axis.set(xlabel="update", ylabel="f (mean over runs)", title=f"M = {workers}")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
