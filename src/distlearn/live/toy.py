"""The dashboard's second view: optimizer trajectories on the toy problems, drawn step by step.

The page picks a problem (:data:`distlearn.toy.problems.PROBLEM_NAMES`: the 2-D test functions of
:mod:`distlearn.toy.functions` and the two 2-feature learning tasks), one or more optimizers, a learning
rate (empty: each optimizer's tuned rate for that problem, :func:`distlearn.toy.runner.default_lr`) and a
number of steps. The server runs :func:`distlearn.toy.runner.run_optimizer` for each optimizer, the same
code ``distlearn toy`` uses (float64, exact gradients, from the problem's start), in a worker thread, then
streams the trajectories one step per tick, so the paths grow on the contour plot the way the overview's
animations do. Computing a whole trajectory takes milliseconds; the pace of the stream is the ``delay``
between ticks, chosen on the page.

Routes (added to the app by :func:`toy_routes`):

* ``/api/toy/options``: problems (window, start, minima, formula, note), optimizers, tuned learning rates;
* ``/api/toy/surface?function=NAME``: log-spaced contour lines of ``f - f*`` (computed with contourpy,
  matplotlib's contouring engine) and a coarse grid of ``log10(f - f*)`` for the shading;
* ``/api/toy/run?function=&optimizers=a,b&lr=&steps=&delay=``: server-sent events ``start``, ``step``
  (every optimizer's point and loss after step t) and ``done``; bad input gives one ``problem`` event
  with the fix, and the stream ends.

Work per request is bounded: the optimizer list is de-duplicated, optimizers x steps may not exceed
:data:`MAX_OPTIMIZER_STEPS`, at most :data:`MAX_CONCURRENT_RUNS` computations run at once (a request beyond
that gets a ``problem`` event saying the server is busy), each computation stops at
:data:`COMPUTE_DEADLINE_S`, and every computation checks the server's stop flag before each optimizer step,
so Ctrl-C ends the server within a step's time whatever is computing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from distlearn.errors import ConfigError, require_extra
from distlearn.live.sse import sse_message

__all__ = [
    "COMPUTE_DEADLINE_S",
    "MAX_CONCURRENT_RUNS",
    "MAX_OPTIMIZER_STEPS",
    "MAX_STEPS",
    "contour_surface",
    "parse_run_request",
    "toy_options",
    "toy_routes",
    "trajectories",
]

MAX_STEPS = 5000
"""The most steps one request may ask for (a page draws at most this many points per path)."""

MAX_OPTIMIZER_STEPS = 20_000
"""The most optimizer steps one request may ask for, summed over its optimizers (every optimizer at 2,000
steps fits; a step takes about a millisecond here, so one request is a few seconds of one core at most)."""

MAX_CONCURRENT_RUNS = 2
"""Toy computations running at once; one more request is told the server is busy (2 cores here)."""

COMPUTE_DEADLINE_S = 30.0
"""A computation still running after this many seconds is stopped and reported (a backstop: the limits
above keep a request to a few seconds)."""

_running = threading.BoundedSemaphore(MAX_CONCURRENT_RUNS)

CONTOUR_LEVELS = 24
SHADING_RESOLUTION = 120
CONTOUR_RESOLUTION = 240


def preload() -> None:
    """Import the toy problems and optimizers now (the server calls this before it accepts requests).

    Importing them takes a second or more on a busy machine (and an optimizer's first step imports more of
    torch); done inside a request it would hold the event loop or a computation past a Ctrl-C. So each
    optimizer takes one step here, before the server accepts requests.
    """
    from distlearn.toy.problems import PROBLEM_NAMES, get_problem
    from distlearn.toy.runner import optimizer_names, run_optimizer

    problem = get_problem(PROBLEM_NAMES[0])
    for name in optimizer_names():
        run_optimizer(problem, name, steps=1)


def toy_options() -> dict[str, Any]:
    """What the page's controls offer: every problem with its geometry, every optimizer, the tuned rates."""
    from distlearn.toy.problems import PROBLEM_NAMES, get_problem
    from distlearn.toy.runner import default_lr, optimizer_names

    optimizers = optimizer_names()
    problems = []
    for name in PROBLEM_NAMES:
        problem = get_problem(name)
        problems.append(
            {
                "name": name,
                "formula": problem.formula,
                "note": problem.note,
                "window": list(problem.window),
                "start": list(problem.start),
                "minima": [list(m) for m in problem.minima],
                "minimum_value": problem.minimum_value,
                "tuned_lr": {opt: default_lr(name, opt) for opt in optimizers},
            }
        )
    return {
        "problems": problems,
        "optimizers": optimizers,
        "max_steps": MAX_STEPS,
        "max_optimizer_steps": MAX_OPTIMIZER_STEPS,
    }


def contour_surface(name: str) -> dict[str, Any]:
    """Contour lines of ``f - f*`` at log-spaced levels, and a shading grid of ``log10(f - f*)``.

    The levels follow :mod:`distlearn.toy.plots`: from a floor (the 0.5th percentile of the gap on the
    window, at least 1e-4 of its maximum) to the maximum, evenly spaced in log, so flat valleys and steep
    walls are both visible. Lines are lists of ``[x, y]`` in the problem's coordinates.
    """
    contourpy = require_extra("contourpy", "live", "the live page's toy view")
    import torch

    from distlearn.toy.problems import get_problem

    problem = get_problem(name)
    x_min, x_max, y_min, y_max = problem.window

    def gap_on(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs = torch.linspace(x_min, x_max, resolution, dtype=torch.float64)
        ys = torch.linspace(y_min, y_max, resolution, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points = torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)  # (resolution^2, 2)
        with torch.no_grad():
            values = problem(points)
        gap = (values - problem.minimum_value).reshape(resolution, resolution).numpy()
        return xs.numpy(), ys.numpy(), gap

    xs, ys, gap = gap_on(CONTOUR_RESOLUTION)
    floor = max(float(np.percentile(gap, 0.5)), 1e-4 * max(float(gap.max()), 1e-12), 1e-12)
    log_gap = np.log10(np.clip(gap, floor, None))
    levels = np.linspace(log_gap.min(), log_gap.max(), CONTOUR_LEVELS)
    generator = contourpy.contour_generator(xs, ys, log_gap, line_type="Separate")
    lines = []
    for index, level in enumerate(levels[1:-1], start=1):
        for path in generator.lines(float(level)):
            lines.append({"level": index, "points": np.round(path, 4).tolist()})
    _, _, coarse = gap_on(SHADING_RESOLUTION)
    shading = np.log10(np.clip(coarse, floor, None))
    return {
        "name": name,
        "window": [x_min, x_max, y_min, y_max],
        "levels": CONTOUR_LEVELS,
        "log_range": [float(log_gap.min()), float(log_gap.max())],
        "lines": lines,
        "shading": {
            "resolution": SHADING_RESOLUTION,
            "values": np.round(shading, 3).ravel().tolist(),  # row-major, row 0 at y_min
        },
    }


def parse_run_request(params: dict[str, str]) -> dict[str, Any]:
    """Validate a run request's query parameters; raises ConfigError naming the bad one and the fix."""
    from distlearn.toy.problems import get_problem
    from distlearn.toy.runner import resolve_optimizers

    name = params.get("function", "rosenbrock")
    get_problem(name)
    spec = params.get("optimizers", "sgd,momentum,adam")
    if len(spec) > 20_000:  # a bound on the parsing; each name counts once below
        raise ConfigError("the optimizer list is too long; name each optimizer once, or pass all")
    optimizers = list(dict.fromkeys(resolve_optimizers(spec)))  # each once, in the given order
    lr_text = params.get("lr", "").strip()
    lr: float | None = None
    if lr_text:
        try:
            lr = float(lr_text)
        except ValueError:
            raise ConfigError(
                f"learning rate {lr_text!r} is not a number; try 0.001, or leave it empty"
            ) from None
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rate must be positive, got {lr_text}; try 0.001, or leave it empty")
    try:
        steps = int(params.get("steps", "300"))
        delay = float(params.get("delay", "0.02"))
    except ValueError:
        raise ConfigError(
            "steps must be an integer and delay a number of seconds, e.g. steps=300 delay=0.02"
        ) from None
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    if not 0 <= delay <= 1:
        raise ConfigError(f"delay must be between 0 and 1 second per step, got {delay}")
    if len(optimizers) * steps > MAX_OPTIMIZER_STEPS:
        fewer = max(1, MAX_OPTIMIZER_STEPS // len(optimizers))
        raise ConfigError(
            f"{len(optimizers)} optimizers x {steps} steps is more than the {MAX_OPTIMIZER_STEPS:,} "
            f"optimizer steps one request may ask for; ask for at most {fewer} steps, or fewer optimizers"
        )
    return {"function": name, "optimizers": optimizers, "lr": lr, "steps": steps, "delay": delay}


class Stopped(Exception):
    """A computation was stopped: the server is stopping, or the deadline passed (``reason`` says which)."""


def trajectories(
    function: str,
    optimizers: list[str],
    lr: float | None,
    steps: int,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Each optimizer's trajectory from :func:`distlearn.toy.runner.run_optimizer`, as plain dicts.

    ``should_stop`` is checked before every step; once it returns true, :class:`Stopped` is raised.
    """
    from distlearn.toy.problems import get_problem
    from distlearn.toy.runner import run_optimizer

    problem = get_problem(function)
    runs = []
    for name in optimizers:
        runs.append(run_optimizer(problem, name, steps=steps, lr=lr, should_stop=should_stop).to_dict())
        if should_stop is not None and should_stop():
            raise Stopped
    return runs


def _compute(stopping: threading.Event, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one request's trajectories in a worker thread, bounded by the deadline and the stop flag."""
    deadline = time.monotonic() + COMPUTE_DEADLINE_S

    def should_stop() -> bool:
        return stopping.is_set() or time.monotonic() > deadline

    if not _running.acquire(blocking=False):
        raise ConfigError(
            f"the server is already computing {MAX_CONCURRENT_RUNS} toy runs; try again when one has finished"
        )
    try:
        runs = trajectories(
            spec["function"], spec["optimizers"], spec["lr"], spec["steps"], should_stop=should_stop
        )
    except Stopped:
        if stopping.is_set():
            raise
        raise ConfigError(
            f"the computation took longer than {COMPUTE_DEADLINE_S:g} s and was stopped; ask for fewer steps"
        ) from None
    finally:
        _running.release()
    return runs


async def _options(request: Request) -> Response:
    return JSONResponse(await anyio.to_thread.run_sync(toy_options))


async def _surface(request: Request) -> Response:
    name = request.query_params.get("function", "rosenbrock")
    try:
        body = await anyio.to_thread.run_sync(contour_surface, name)
    except ConfigError as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    return JSONResponse(body)


async def _run(request: Request) -> Response:
    state = request.app.state.live

    async def stream() -> AsyncIterator[str]:
        if state.stopping.is_set():
            return
        try:
            spec = parse_run_request(dict(request.query_params))
            runs = await anyio.to_thread.run_sync(_compute, state.stopping, spec, abandon_on_cancel=True)
        except ConfigError as error:
            yield sse_message("problem", {"type": "problem", "message": str(error)})
            return
        except Stopped:  # the server is stopping
            return
        yield sse_message(
            "start",
            {
                "function": spec["function"],
                "steps": spec["steps"],
                "runs": [
                    {
                        "optimizer": r["optimizer"],
                        "lr": r["lr"],
                        "diverged": r["diverged"],
                        "steps": len(r["points"]) - 1,
                    }
                    for r in runs
                ],
            },
        )
        longest = max(len(r["points"]) for r in runs)
        for t in range(longest):
            if state.stopping.is_set():
                return
            points = {r["optimizer"]: r["points"][t] for r in runs if t < len(r["points"])}
            losses = {r["optimizer"]: r["losses"][t] for r in runs if t < len(r["losses"])}
            yield sse_message("step", {"t": t, "points": points, "losses": losses})
            if spec["delay"]:
                await asyncio.sleep(spec["delay"])
        final = {
            r["optimizer"]: {
                "loss": r["losses"][-1],
                "steps": len(r["points"]) - 1,
                "diverged": r["diverged"],
                "gradient_evaluations": r["gradient_evaluations"][-1],
            }
            for r in runs
        }
        yield sse_message("done", {"final": final})

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def toy_routes() -> list[Route]:
    """The toy view's routes, mounted by :func:`distlearn.live.server.create_app`."""
    return [
        Route("/api/toy/options", _options),
        Route("/api/toy/surface", _surface),
        Route("/api/toy/run", _run),
    ]
