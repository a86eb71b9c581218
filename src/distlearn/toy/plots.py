"""Pictures of optimizer trajectories: a contour plot with every path, and an animated GIF.

The contour levels are log-spaced in ``f - f*`` so the flat valleys (Rosenbrock) and the steep walls
(Beale) are both visible. The GIF draws the paths step by step, in the manner of the well-known optimizer
animations (Radford 2014; Ruder 2016), on a time axis that slows the first steps down (frame k shows
step ``T (k/K)^2``) because that is where the methods differ most. Matplotlib runs on the Agg backend
(no display needed) and Pillow writes the GIF with one shared palette, which keeps it small.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from PIL import Image  # noqa: E402

from distlearn.toy.functions import TestFunction  # noqa: E402
from distlearn.toy.runner import Trajectory  # noqa: E402

__all__ = ["contour_figure", "frame_schedule", "save_animation", "save_contour_plot"]

# One colour per optimizer, stable across pictures (tab10 plus a tenth).
_COLOURS = plt.get_cmap("tab10").colors


def _colour(index: int) -> tuple[float, float, float]:
    return _COLOURS[index % len(_COLOURS)]


def _grid(problem: TestFunction, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The surface f - f* on a resolution x resolution grid over the problem's window."""
    x_min, x_max, y_min, y_max = problem.window
    xs = torch.linspace(x_min, x_max, resolution, dtype=torch.float64)
    ys = torch.linspace(y_min, y_max, resolution, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)  # (resolution^2, 2)
    with torch.no_grad():
        values = problem(points)
    gap = (values - problem.minimum_value).reshape(resolution, resolution).numpy()
    return grid_x.numpy(), grid_y.numpy(), gap


def _draw_surface(axes, problem: TestFunction, resolution: int = 300, filled: bool = True) -> None:
    """Log-spaced contours of f - f*, the minima (gold stars) and the start (black dot).

    ``filled`` shades between the lines; the GIF leaves it out because flat colour compresses far better.
    """
    grid_x, grid_y, gap = _grid(problem, resolution)
    floor = max(float(np.percentile(gap, 0.5)), 1e-4 * max(float(gap.max()), 1e-12), 1e-12)
    gap = np.clip(gap, floor, None)
    levels = np.logspace(np.log10(floor), np.log10(gap.max()), 24)
    if filled:
        axes.contourf(grid_x, grid_y, gap, levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.4)
    axes.contour(grid_x, grid_y, gap, levels=levels, norm=LogNorm(), colors="0.45", linewidths=0.5)
    for minimum in problem.minima:
        axes.plot(*minimum, marker="*", markersize=14, color="gold", markeredgecolor="black", zorder=5)
    axes.plot(*problem.start, marker="o", markersize=6, color="black", zorder=5)
    x_min, x_max, y_min, y_max = problem.window
    axes.set_xlim(x_min, x_max)
    axes.set_ylim(y_min, y_max)
    axes.set_xlabel("x")
    axes.set_ylabel("y")


def _label(trajectory: Trajectory) -> str:
    return f"{trajectory.optimizer} (lr={trajectory.lr:.3g})" + (" diverged" if trajectory.diverged else "")


def contour_figure(problem: TestFunction, runs: Mapping[str, Trajectory], *, tolerance: float | None = None):
    """A figure: left, the contour plot with every trajectory; right, ``f - f*`` against step."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1.15, 1]})
    _draw_surface(left, problem)
    left.set_title(f"{problem.name}: {problem.formula}", fontsize=10)
    for index, trajectory in enumerate(runs.values()):
        points = np.asarray(trajectory.points)
        colour = _colour(index)
        left.plot(points[:, 0], points[:, 1], "-", color=colour, linewidth=1.6, label=_label(trajectory))
        left.plot(points[-1, 0], points[-1, 1], "o", color=colour, markersize=5, markeredgecolor="black")
        gaps = np.maximum(np.asarray(trajectory.losses) - problem.minimum_value, 1e-16)
        right.plot(np.arange(len(gaps)), gaps, color=colour, linewidth=1.4, label=trajectory.optimizer)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel(r"$f(z_t) - f^*$")
    right.set_title("distance to the minimum value", fontsize=10)
    right.grid(True, which="major", alpha=0.3)
    if tolerance is not None:
        right.axhline(
            tolerance, color="black", linestyle="--", linewidth=0.8, label=f"tolerance {tolerance:g}"
        )
    left.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    right.legend(loc="upper right", fontsize=8, framealpha=0.9).set_visible(False)
    figure.tight_layout()
    return figure


def save_contour_plot(
    path: str | Path, problem: TestFunction, runs: Mapping[str, Trajectory], *, tolerance: float | None = None
) -> Path:
    """Write the contour plot with every trajectory (and the ``f - f*`` curves) to ``path`` (PNG)."""
    path = Path(path)
    figure = contour_figure(problem, runs, tolerance=tolerance)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _palette_image(colours: int) -> Image.Image:
    """A "P" image whose palette is the trajectory colours, gold and black, then 160 greys (<= 256)."""
    named = [_colour(i) for i in range(colours)] + [(1.0, 0.84, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]
    entries = [tuple(round(255 * c) for c in colour) for colour in named]
    entries += [(g, g, g) for g in np.linspace(0, 255, 256 - len(entries)).round().astype(int).tolist()]
    palette = Image.new("P", (1, 1))
    palette.putpalette([channel for entry in entries[:256] for channel in entry])
    return palette


def frame_schedule(total_steps: int, frames: int, power: float = 2.0) -> list[int]:
    """Increasing step indices 0..total_steps for ``frames`` frames, ``T (k / (K - 1))^power``, no repeats."""
    if total_steps <= 0 or frames <= 1:
        return [max(total_steps, 0)]
    ticks = np.round(total_steps * (np.arange(frames) / (frames - 1)) ** power).astype(int)
    return sorted(set(ticks.tolist()))


def save_animation(
    path: str | Path,
    problem: TestFunction,
    runs: Mapping[str, Trajectory],
    *,
    frames: int = 60,
    frame_ms: int = 60,
    hold_ms: int = 2000,
    dpi: int = 72,
) -> Path:
    """Write an animated GIF: the trajectories drawn step by step over the contour plot."""
    path = Path(path)
    figure, axes = plt.subplots(figsize=(6.6, 5.0))
    _draw_surface(axes, problem, resolution=200, filled=False)
    axes.set_title(f"{problem.name}: {problem.formula}", fontsize=10)
    paths = [np.asarray(t.points) for t in runs.values()]
    lines, heads = [], []
    for index, trajectory in enumerate(runs.values()):
        colour = _colour(index)
        (line,) = axes.plot([], [], "-", color=colour, linewidth=1.8, label=trajectory.optimizer)
        (head,) = axes.plot([], [], "o", color=colour, markersize=7, markeredgecolor="black", zorder=6)
        lines.append(line)
        heads.append(head)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    counter = axes.text(
        0.02,
        0.03,
        "",
        transform=axes.transAxes,
        fontsize=10,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    figure.tight_layout()
    total = max((len(p) - 1 for p in paths), default=0)
    images: list[Image.Image] = []
    for step in frame_schedule(total, frames):
        for points, line, head in zip(paths, lines, heads, strict=True):
            shown = points[: step + 1]
            line.set_data(shown[:, 0], shown[:, 1])
            head.set_data(shown[-1:, 0], shown[-1:, 1])
        counter.set_text(f"step {step}")
        figure.canvas.draw()
        rgb = np.asarray(figure.canvas.buffer_rgba())[:, :, :3]
        images.append(Image.fromarray(rgb.copy()))
    plt.close(figure)
    # One fixed palette for every frame: the optimizers' colours, gold, and a grey ramp for the contours.
    palette = _palette_image(len(paths))
    quantized = [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
    durations = [frame_ms] * (len(quantized) - 1) + [hold_ms]
    quantized[0].save(
        path,
        save_all=True,
        append_images=quantized[1:],
        duration=durations,
        loop=0,
        optimize=False,
        disposal=1,
    )
    return path
