"""The report's PNGs: learning curves per game, interval estimates, P(improvement), performance profiles and
sample-efficiency curves (the statistics come from `driml_pl.tools.intervals`; this module only draws)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from driml_pl.tools.intervals import AGGREGATES, BASELINE, Intervals
from driml_pl.tools.plots import format_env_steps
from driml_pl.tools.runs import METHODS, PAPER_TABLE, Run

COLORS = {m: f"C{i}" for i, m in enumerate(METHODS)}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def plot_game(
    game: str, runs: Sequence[Run], random: float | None, path: Path, unfinished: Collection[Path] = ()
) -> Path:
    """Each method's mean rollout return over seeds (band: +-1 std over seeds), the paper's 50M values and the random
    policy as horizontal lines. Every run is drawn over the env steps it reached; the legend counts the runs whose
    paths are in ``unfinished``."""
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    for method in (m for m in METHODS if any(r.method == m for r in runs)):
        curves = [r for r in runs if r.method == method]
        grid = np.linspace(min(r.env_steps.min() for r in curves), max(r.max_env_steps for r in curves), 200)
        # each seed is interpolated inside its own range only; the band covers the seeds present at each x
        ys = np.array([np.where((grid >= r.env_steps.min()) & (grid <= r.max_env_steps),
                                np.interp(grid, r.env_steps, r.returns), np.nan) for r in curves])  # fmt: skip
        present = ~np.isnan(ys)
        count = np.maximum(present.sum(axis=0), 1)
        mean = np.where(present.any(axis=0), np.where(present, ys, 0.0).sum(axis=0) / count, np.nan)
        std = np.sqrt(np.where(present, (ys - mean) ** 2, 0.0).sum(axis=0) / count)
        color = COLORS[method]
        short = sum(r.path in unfinished for r in curves)
        seeds = f"{len(curves)} seed(s)" + (f", {short} unfinished" if short else "")
        ax.plot(grid, mean, color=color, label=f"{method}: mean of {seeds}, band ±1 std")
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2)
        ax.axhline(PAPER_TABLE[game][method][0], color=color, linestyle="--", linewidth=1,
                   label=f"{method}: paper, 50M env steps")  # fmt: skip
    if random is not None:
        ax.axhline(random, color="0.35", linestyle=":", linewidth=1.5, label=f"random policy ({random:+.2f})")
    ax.set(title=f"{game}: rollout return (mean of the last 100 episodes)", xlabel="env steps",
           ylabel="episode return")  # fmt: skip
    format_env_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


def _methods(res: Intervals) -> list[str]:
    return [m for m in METHODS if m in res.aggregates]


def plot_intervals(res: Intervals, label: str, path: Path) -> Path:
    """One panel per aggregate metric: each method's point estimate and 95% interval."""
    methods = _methods(res)
    fig = _figure(12, 1.2 + 0.45 * len(methods))
    axes = fig.subplots(1, len(AGGREGATES), sharey=True)
    for ax, metric in zip(axes, AGGREGATES, strict=True):
        for y, m in enumerate(methods):
            point, ci = res.aggregates[m][metric]
            if ci is not None:
                ax.barh(y, ci[1] - ci[0], left=ci[0], height=0.6, color=COLORS[m], alpha=0.45)
            ax.plot([point], [y], marker="|", markersize=18, color="k")
        ax.set(title=metric, yticks=range(len(methods)), yticklabels=methods, ylim=(-0.6, len(methods) - 0.4))
        ax.set_xlabel("normalised score" + (" (lower is better)" if metric == "optimality gap" else ""))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{label}; {len(res.games)} game(s), bars: 95% stratified-bootstrap intervals")
    return _save(fig, path)


def plot_improvement(res: Intervals, path: Path) -> Path:
    """P(method > C51) with its 95% interval, one row per method; 0.5 marked."""
    methods = [m for m in _methods(res) if m != BASELINE]
    fig = _figure(6.5, 1.4 + 0.5 * len(methods))
    ax = fig.add_subplot()
    for y, m in enumerate(methods):
        point, ci = res.improvement[m]
        if ci is not None:
            ax.barh(y, ci[1] - ci[0], left=ci[0], height=0.6, color=COLORS[m], alpha=0.45)
        ax.plot([point], [y], marker="|", markersize=18, color="k")
    ax.axvline(0.5, color="0.4", linestyle="--", linewidth=1)
    ax.set(
        xlim=(0, 1),
        yticks=range(len(methods)),
        yticklabels=methods,
        ylim=(-0.6, len(methods) - 0.4),
        xlabel="P(method > C51)",
        title=f"probability of improvement over C51 ({len(res.games)} game(s))",
    )
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _band(ax: Axes, x: np.ndarray, ci: np.ndarray | None, color: str) -> None:
    if ci is not None:
        ax.fill_between(x, ci[0], ci[1], color=color, alpha=0.2)


def _lines_with_bands(ax: Axes, res: Intervals, x: np.ndarray, ys: dict, cis: dict) -> None:
    """One line per method, labelled with its runs per game, and its 95% band."""
    for m in _methods(res):
        ax.plot(x, ys[m], color=COLORS[m], label=f"{m} ({res.runs[m]} runs/game)")
        _band(ax, x, cis[m], COLORS[m])


def plot_profiles(res: Intervals, label: str, path: Path) -> Path:
    """Performance profiles: the fraction of runs with a normalised score above tau, with 95% bands."""
    fig = _figure(7, 4.4)
    ax = fig.add_subplot()
    assert res.profile_taus is not None
    _lines_with_bands(ax, res, res.profile_taus, res.profiles, res.profile_cis)
    ax.set(xlabel=f"normalised score tau ({label})", ylabel="fraction of runs with score > tau", ylim=(-0.02, 1.02),
           title="performance profile (bands: 95% stratified bootstrap)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_sample_efficiency(res: Intervals, label: str, path: Path) -> Path:
    """IQM of the normalised rollout curves against env steps, with 95% bands."""
    fig = _figure(7.5, 4.4)
    ax = fig.add_subplot()
    assert res.curve_steps is not None
    _lines_with_bands(ax, res, res.curve_steps, res.curves, res.curve_cis)
    ax.set(xlabel="env steps", ylabel=f"IQM normalised return ({label})",
           title="sample efficiency (bands: 95% stratified bootstrap)")  # fmt: skip
    format_env_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
