"""`python -m driml_pl plot RUN_DIR [--out FILE]`: one PNG of a run against env steps (also written at the end of fit).

Three panels from ``RUN_DIR/logs/version_*/metrics.csv`` (every start and resume of the run): returns (the rollout's
mean over the last 100 episodes, and the evaluations on training and held-out levels with their std), the C51 loss,
and the InfoNCE losses. ``train/*`` values are the means over each logging interval (``trainer.log_every_n_steps``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

X_KEYS = ("rollout/env_steps", "eval/env_steps")
RETURNS = {
    "rollout/episode_return": "rollout (last 100 episodes)",
    "eval/train_levels_return": "eval, training levels",
    "eval/test_levels_return": "eval, held-out levels",
}
PLOT_NAME = "plot.png"

Series = dict[str, tuple[np.ndarray, np.ndarray]]


def format_env_steps(ax: Axes, nbins: int = 6) -> None:
    """Env-step x axis that reads at a glance: at most ``nbins`` ticks labelled 0, 50k, 100k, 1.5M, 50M."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def read_rows(run: Path) -> list[dict[str, str]]:
    """Every row of every ``metrics.csv`` of the run, oldest version first."""
    rows: list[dict[str, str]] = []
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        path = version / "metrics.csv"
        if path.is_file():
            with open(path, newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def extract_series(rows: Sequence[dict[str, str]]) -> Series:
    """``{metric: (env_steps, values)}`` for the returns, the eval std bands, C51 and every InfoNCE term.

    A row's x is its ``rollout/env_steps`` (training rows) or ``eval/env_steps`` (evaluation rows); rows without
    either take the env steps of the latest training row of the same Lightning ``step``. Sorted by env steps
    (stable).
    """
    wanted = [*RETURNS, "eval/train_levels_return_std", "eval/test_levels_return_std", "train/c51_loss"]
    keys = {k for row in rows for k in row}
    wanted += sorted(k for k in keys if k.startswith("train/nce_"))
    step_x: dict[str, float] = {}
    points: dict[str, list[tuple[float, float]]] = {k: [] for k in wanted if k in keys}
    for row in rows:
        x = next((v for v in (_float(row.get(k)) for k in X_KEYS) if not math.isnan(v)), math.nan)
        if math.isnan(x):
            x = step_x.get(row.get("step", ""), math.nan)
        elif not math.isnan(_float(row.get("rollout/env_steps"))):
            step_x[row.get("step", "")] = x
        if math.isnan(x):
            continue
        for key in points:
            y = _float(row.get(key))
            if not math.isnan(y):
                points[key].append((x, y))
    out: Series = {}
    for key, pts in points.items():
        if pts:
            xy = np.array(sorted(pts, key=lambda p: p[0]))  # stable: equal env steps keep the log's order
            out[key] = (xy[:, 0], xy[:, 1])
    return out


def references(run: Path) -> dict[str, float]:
    """Horizontal reference lines for the run's return panel, from its last config: the random policy's return on
    its level set (`driml_pl.tools.report.RANDOM_RETURNS`, where known) and the paper's 50M-step value for its game and
    method. Empty when the config cannot be read."""
    from driml_pl.tools.runs import PAPER_TABLE, RANDOM_RETURNS, classify

    configs = sorted((run / "logs").glob("version_*/config.yaml"), key=lambda p: int(p.parent.name.split("_")[1]))
    try:
        config = yaml.safe_load(configs[-1].read_text()) or {}
        env = config["data"]["env"]
        game, method = env["game"], classify(config)
        levels, start = int(env.get("num_levels", 0)), int(env.get("start_level", 0))
        key = (game, levels, start, str(env.get("distribution_mode", "easy")))
    except (IndexError, KeyError, TypeError, ValueError, OSError, yaml.YAMLError):
        return {}
    out = {}
    if key in RANDOM_RETURNS:
        out["random policy"] = RANDOM_RETURNS[key][0]
    if game in PAPER_TABLE:
        out[f"paper {method}, 50M env steps"] = PAPER_TABLE[game][method][0]
    return out


def plot_series(series: Series, title: str, out: Path, refs: dict[str, float] | None = None) -> Path:
    """Draw the three panels (returns with the reference lines ``refs``, C51 loss, InfoNCE losses) and write the PNG
    (atomically)."""
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ret, c51, nce = fig.subplots(1, 3)
    for key, label in RETURNS.items():
        if key in series:
            x, y = series[key]
            marker = "o" if key.startswith("eval/") else None
            std = series.get(f"{key}_std")
            band = std is not None and len(std[0]) == len(x)
            (line,) = ret.plot(x, y, label=label + (" ±1 std" if band else ""), marker=marker, markersize=4)
            if std is not None and band:
                ret.fill_between(x, y - std[1], y + std[1], alpha=0.2, color=line.get_color())
    for name, value in (refs or {}).items():
        style = ":" if name.startswith("random") else "--"
        ret.axhline(value, color="0.35", linestyle=style, linewidth=1.2, label=f"{name} ({value:+.2f})")
    ret.set(title="return", xlabel="env steps", ylabel="episode return")
    if "train/c51_loss" in series:
        c51.plot(*series["train/c51_loss"], color="tab:red")
    c51.set(title="C51 loss", xlabel="env steps")
    for key in sorted(k for k in series if k.startswith("train/nce_")):
        nce.plot(*series[key], label=key.removeprefix("train/"))
    nce.set(title="InfoNCE losses", xlabel="env steps")
    for ax, what in ((ret, "no return logged yet"), (c51, "no C51 loss logged"), (nce, "no InfoNCE term (C51)")):
        if not ax.has_data():
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set(xticks=[], yticks=[])
            continue
        format_env_steps(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    return out


def plot_run(run: Path, out: Path | None = None) -> Path:
    """The run's PNG, by default ``RUN/plot.png``."""
    rows = read_rows(run)
    if not rows:
        raise FileNotFoundError(f"{run} holds no logs/version_*/metrics.csv")
    return plot_series(extract_series(rows), str(run), out or run / PLOT_NAME, references(run))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="driml_pl plot", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (trainer.default_root_dir)")
    parser.add_argument("--out", type=Path, default=None, help=f"PNG to write (default RUN/{PLOT_NAME})")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run, args.out))
    except FileNotFoundError as err:
        print(f"driml_pl: error: {err}", file=sys.stderr)
        return 2
    return 0
