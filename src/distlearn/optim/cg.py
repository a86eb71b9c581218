"""Nonlinear conjugate gradients with Fletcher-Reeves or Hestenes-Stiefel beta (overview, section 2).

Update (the overview's notation; it prints ``W = alpha * p``, a typo for the line below)::

    p = beta * p - g          (p = -g on the first step and after a restart)
    W = W + alpha * p

with ``beta`` by Fletcher & Reeves (1964), ``g.g / g_prev.g_prev``, or by Hestenes & Stiefel (1952),
``g.(g - g_prev) / ((g - g_prev).p)``, and ``alpha`` from a line search along ``p``:

* ``line_search="strong_wolfe"`` (default): the strong-Wolfe search of ``torch.optim.LBFGS``
  (``torch.optim.lbfgs._strong_wolfe``, cubic interpolation with bracketing), here with ``c2 = 0.1`` as
  Nocedal & Wright (2006, section 5.2) recommend for CG, so that ``p`` stays a descent direction;
* ``line_search="exact"``: a root of the directional derivative ``phi'(a) = g(W + a p).p`` by
  bracketing and the Illinois variant of regula falsi, to a relative tolerance ``line_search_tol``.
  On a quadratic ``phi'`` is linear and the first secant step is exact, which is what makes CG finish an
  ``n``-dimensional strictly convex quadratic in ``n`` steps;
* ``line_search=None``: the fixed step ``alpha = lr`` using the stored ``.grad`` (no closure needed),
  which turns CG into a momentum method with an adaptive ``beta`` usable in a minibatch loop.

Restarts (``p = -g``): when ``beta < 0`` (the "+" of PR+/HS+), when ``p`` is not a descent direction,
when successive gradients are far from orthogonal (Powell, 1977: ``|g.g_prev| >= 0.2 g.g``; exact CG
on a quadratic keeps them orthogonal, so this fires only where the function is far from quadratic), and
every ``restart_every`` steps if set (``n``, the number of parameters, is the classical choice; Powell's
test makes it unnecessary and on small ``n`` it slows CG down, so it is off by default).

The directions span all parameters, so like ``torch.optim.LBFGS`` the optimizer takes a single param
group. Like LBFGS, one :meth:`ConjugateGradient.step` call may run up to ``max_iter`` iterations,
re-using the gradient found by each line search, and stops early when the gradient's
largest entry falls below ``tolerance_grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

from distlearn.errors import ConfigError
from distlearn.optim.base import check_nonnegative

__all__ = ["ConjugateGradient", "FletcherReeves", "HestenesStiefel"]

_BETAS = ("fletcher-reeves", "hestenes-stiefel")
_SEARCHES = ("strong_wolfe", "exact", None)


class ConjugateGradient(torch.optim.Optimizer):
    """Nonlinear conjugate gradients; see the module docstring for the rule and its options.

    Args:
        params: the parameters (one group).
        lr: first trial step of each line search, or the fixed ``alpha`` when ``line_search=None``.
        beta: ``"fletcher-reeves"`` or ``"hestenes-stiefel"``.
        line_search: ``"strong_wolfe"``, ``"exact"`` or ``None``.
        restart_every: force ``p = -g`` every this many iterations (default: never; ``n``, the number
            of parameters, is the classical choice).
        restart_orthogonality: Powell's restart: ``p = -g`` when ``|g.g_prev| >= nu * g.g``
            (default ``nu = 0.2``; ``None`` disables it).
        max_iter: iterations per ``step()`` call.
        max_eval: closure evaluations per ``step()`` call (default ``max_iter * 25``).
        tolerance_grad: stop when ``max |g| <= tolerance_grad``.
        tolerance_change: stop when the loss or the step changes less than this.
        c1, c2: the Wolfe constants (sufficient decrease, curvature).
        line_search_tol: the exact search stops at ``|phi'(a)| <= line_search_tol * |phi'(0)|``.

    Example::

        opt = ConjugateGradient(model.parameters(), beta="hestenes-stiefel")
        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        beta: Literal["fletcher-reeves", "hestenes-stiefel"] = "fletcher-reeves",
        line_search: Literal["strong_wolfe", "exact"] | None = "strong_wolfe",
        restart_every: int | None = None,
        restart_orthogonality: float | None = 0.2,
        max_iter: int = 1,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-10,
        tolerance_change: float = 1e-12,
        c1: float = 1e-4,
        c2: float = 0.1,
        line_search_tol: float = 1e-10,
    ) -> None:
        name = type(self).__name__
        check_nonnegative("lr", lr, name, "use a positive first trial step such as lr=1.0")
        if not lr > 0:
            raise ConfigError(f"{name}: lr must be positive, got {lr}; use e.g. lr=1.0")
        if beta not in _BETAS:
            raise ConfigError(f"{name}: unknown beta {beta!r}; choose one of {', '.join(_BETAS)}")
        if line_search not in _SEARCHES:
            raise ConfigError(
                f"{name}: unknown line_search {line_search!r}; choose 'strong_wolfe', 'exact' or None"
            )
        if not 0 < c1 < c2 < 1:
            raise ConfigError(f"{name}: need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}; use c1=1e-4, c2=0.1")
        if restart_every is not None and restart_every < 1:
            raise ConfigError(f"{name}: restart_every must be >= 1, got {restart_every}")
        if max_iter < 1:
            raise ConfigError(f"{name}: max_iter must be >= 1, got {max_iter}")
        defaults = {
            "lr": lr,
            "beta": beta,
            "line_search": line_search,
            "restart_every": restart_every,
            "restart_orthogonality": restart_orthogonality,
            "max_iter": max_iter,
            "max_eval": max_eval if max_eval is not None else max_iter * 25,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "c1": c1,
            "c2": c2,
            "line_search_tol": line_search_tol,
        }
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ConfigError(
                f"{name} takes one parameter group (its directions span all parameters); "
                "pass model.parameters() without groups"
            )
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]
        self._numel = sum(p.numel() for p in self._params)

    # -- flat views of the parameters ---------------------------------------------------------------------

    def _gather_flat_grad(self) -> torch.Tensor:
        views = []
        for p in self._params:
            if p.grad is None:
                views.append(p.new_zeros(p.numel()))
            elif p.grad.is_sparse:
                raise ConfigError(f"{type(self).__name__} does not support sparse gradients")
            else:
                views.append(p.grad.reshape(-1))
        return torch.cat(views)

    def _add(self, step: float, direction: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.add_(direction[offset : offset + n].view_as(p), alpha=step)
            offset += n

    def _clone_params(self) -> list[torch.Tensor]:
        return [p.clone(memory_format=torch.contiguous_format) for p in self._params]

    def _set_params(self, values: list[torch.Tensor]) -> None:
        for p, value in zip(self._params, values, strict=True):
            p.copy_(value)

    def _evaluate(self, closure: Callable[[], Any], x: list[torch.Tensor], t: float, d: torch.Tensor):
        """Loss and flat gradient at ``x + t * d`` (leaves the parameters there)."""
        self._set_params(x)
        self._add(t, d)
        with torch.enable_grad():
            loss = float(closure().detach())
        return loss, self._gather_flat_grad()

    # -- the step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run up to ``max_iter`` CG iterations; returns the loss at the starting point."""
        group = self.param_groups[0]
        state = self.state[self._params[0]]
        state.setdefault("iteration", 0)
        state.setdefault("func_evals", 0)
        if group["line_search"] is not None and closure is None:
            raise ConfigError(
                f"{type(self).__name__} with line_search={group['line_search']!r} needs a closure: call "
                "optimizer.step(closure) with a closure that zeroes the gradients, computes the loss, calls "
                "backward() and returns the loss; or use line_search=None for a fixed step lr"
            )
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            state["func_evals"] += 1
            evaluations = 1
        else:
            loss, evaluations = None, 0
        g = self._gather_flat_grad()
        f = float("nan") if loss is None else float(torch.as_tensor(loss).detach())
        restart_every = group["restart_every"] or 0
        for _ in range(group["max_iter"]):
            if g.abs().max() <= group["tolerance_grad"]:
                break
            d_prev, g_prev = state.get("direction"), state.get("prev_grad")
            beta = 0.0
            periodic = restart_every > 0 and state["iteration"] % restart_every == 0
            if d_prev is not None and not periodic:
                if group["beta"] == "fletcher-reeves":
                    beta = float(g.dot(g) / g_prev.dot(g_prev))
                else:
                    y = g - g_prev
                    denominator = float(y.dot(d_prev))
                    beta = float(g.dot(y)) / denominator if denominator != 0 else 0.0
                if not (beta >= 0 and beta < float("inf")):  # beta < 0 or NaN: restart
                    beta = 0.0
                nu = group["restart_orthogonality"]  # Powell (1977): successive gradients far from orthogonal
                if nu is not None and abs(float(g.dot(g_prev))) >= nu * float(g.dot(g)):
                    beta = 0.0
            d = -g if beta == 0.0 else d_prev.mul(beta).sub_(g)
            gtd = float(g.dot(d))
            if not gtd < 0:  # not a descent direction: restart along -g
                d, gtd = -g, float(-g.dot(g))
            state["iteration"] += 1

            if group["line_search"] is None:
                t = group["lr"]
                self._add(t, d)
                state["direction"], state["prev_grad"] = d, g.clone()
                break  # without a closure there is no new gradient to continue with

            # First trial step: lr for the first iteration (scaled so the first move is at most lr in
            # the 1-norm, as LBFGS does); afterwards the minimiser of the quadratic through f, phi'(0)
            # and the last decrease in f (Nocedal & Wright, 2006, eq. 3.60, as scipy's CG does).
            if "last_change" not in state:
                t = min(1.0, 1.0 / float(g.abs().sum())) * group["lr"]
            else:
                t = min(1.0, 1.01 * 2 * state["last_change"] / gtd) if gtd != 0 else group["lr"]
                t = t if t > 0 else group["lr"]
            x = self._clone_params()
            if group["line_search"] == "strong_wolfe":
                f_new, g_new, t, used = self._strong_wolfe(closure, x, t, d, f, g, gtd, group)
            else:
                f_new, g_new, t, used = self._exact(closure, x, t, d, f, g, gtd, group)
            self._set_params(x)
            self._add(t, d)
            evaluations += used
            state["func_evals"] += used
            state["direction"], state["prev_grad"] = d, g
            change = abs(f_new - f)
            state["last_change"] = f_new - f if f_new == f_new and f == f else 0.0
            f, g = f_new, g_new
            if evaluations >= group["max_eval"]:
                break
            if (
                float(d.abs().max()) * abs(t) <= group["tolerance_change"]
                or change < group["tolerance_change"]
            ):
                break
        state["loss"] = f
        return loss

    def _strong_wolfe(self, closure, x, t, d, f, g, gtd, group):
        try:
            from torch.optim.lbfgs import _strong_wolfe
        except ImportError as error:  # pragma: no cover - torch moved its private helper
            raise ConfigError(
                f"this torch ({torch.__version__}) has no torch.optim.lbfgs._strong_wolfe; "
                "use line_search='exact'"
            ) from error

        def objective(x_, t_, d_):
            return self._evaluate(closure, x_, t_, d_)

        f_new, g_new, t, used = _strong_wolfe(
            objective, x, t, d, f, g, gtd, c1=group["c1"], c2=group["c2"],
            tolerance_change=group["tolerance_change"], max_ls=25,
        )  # fmt: skip
        return float(f_new), g_new, float(t), int(used)

    def _exact(self, closure, x, t, d, f, g, gtd, group):
        """Zero of ``phi'(a) = g(x + a d).d`` by bracketing, then Illinois regula falsi."""
        tolerance = group["line_search_tol"] * abs(gtd)
        lo, dlo, flo, glo = 0.0, gtd, f, g
        hi = None
        used = 0
        a = t
        while used < 60:
            fa, ga = self._evaluate(closure, x, a, d)
            used += 1
            da = float(ga.dot(d))
            if abs(da) <= tolerance:
                return fa, ga, a, used
            if da < 0:
                lo, dlo, flo, glo = a, da, fa, ga
                if hi is None:
                    a *= 4.0  # still descending: expand
                    continue
            else:
                hi, dhi, side = a, da, 1
            break
        else:
            return flo, glo, lo, used
        if hi is None:
            return flo, glo, lo, used
        side = 0
        best = (flo, glo, lo)
        while used < 60:
            a = (lo * dhi - hi * dlo) / (dhi - dlo)  # secant root of phi' between lo and hi
            fa, ga = self._evaluate(closure, x, a, d)
            used += 1
            da = float(ga.dot(d))
            best = (fa, ga, a)
            if abs(da) <= tolerance or hi - lo <= 1e-16 * max(1.0, abs(hi)):
                break
            if da < 0:
                lo, dlo = a, da
                if side == -1:
                    dhi /= 2  # Illinois: halve the stale end's value
                side = -1
            else:
                hi, dhi = a, da
                if side == 1:
                    dlo /= 2
                side = 1
        return best[0], best[1], best[2], used


class FletcherReeves(ConjugateGradient):
    """Nonlinear CG with Fletcher-Reeves beta ``g.g / g_prev.g_prev`` (Fletcher & Reeves, 1964)."""

    def __init__(self, params: Iterable[Any], lr: float = 1.0, **options: Any) -> None:
        super().__init__(params, lr, beta="fletcher-reeves", **options)


class HestenesStiefel(ConjugateGradient):
    """Nonlinear CG with Hestenes-Stiefel beta ``g.(g - g_prev) / ((g - g_prev).p)`` (1952)."""

    def __init__(self, params: Iterable[Any], lr: float = 1.0, **options: Any) -> None:
        super().__init__(params, lr, beta="hestenes-stiefel", **options)
