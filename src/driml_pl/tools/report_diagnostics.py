"""The report's view inside the runs: DRIML-ada's chosen horizons and the ``probe/*`` logs (``model.probe``).

Both read the same ``metrics.csv`` files as the scores (`driml_pl.tools.runs`), so a committed study (config.yaml and
metrics.csv of every run) rebuilds them. Written by `driml_pl.tools.report.write_report` where the runs logged them:

* ``horizons_<game>.png`` and a "DRIML-ada's horizons" table: the share of each effective k (``horizon/k_frac_<k>``)
  over env steps, and each run's mean k against the band the paper's figures show (batch-mean k 1.3-3.1, spec §8.8).
* ``probes_<game>.png``: per method (columns), each run's gradient norms per loss term over the encoder, their cosine,
  the action gap, the Q-values and the greedy actions' entropy (rows), each run coloured by its final score, so a
  stalled seed stands out from the ones that learned.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from driml_pl.tools.plots import format_env_steps
from driml_pl.tools.report_figures import _figure, _save
from driml_pl.tools.runs import METHODS, Run

K_BINS = 14  # horizon/k_frac_0 .. _13, then k_frac_over13 (`driml_pl.learner.metrics.K_LOGGED`)
PAPER_MEAN_K = (1.3, 3.1)  # the batch-mean k the paper's DRIML-ada figures show (spec §8.8)
PROBES = (
    ("probe/grad_encoder_c51", "|grad| C51, encoder"),
    ("probe/grad_encoder_gg", "|grad| lambda*InfoNCE GG, encoder"),
    ("probe/grad_cos_c51_gg", "cos(grad C51, grad InfoNCE GG)"),
    ("probe/action_gap", "action gap (best - 2nd Q)"),
    ("probe/q_mean", "mean Q"),
    ("probe/greedy_entropy", "greedy actions' entropy (nats)"),
)


def series(run: Run, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (env_steps, values)}`` of the training rows that log ``key`` (over every version of the run; the rows
    an earlier version logged at or past the first env step of a later one were redone and are dropped)."""
    by_version: list[list[dict[str, str]]] = []
    for version in sorted((run.path / "logs").glob("version_*"), key=lambda p: int(p.name[8:] or 0)):
        rows = read_rows_of(version)
        if rows:
            by_version.append(rows)
    kept: list[dict[str, str]] = []
    for rows in by_version:
        first = _value(rows[0], "rollout/env_steps")
        kept = [r for r in kept if _value(r, "rollout/env_steps") < first] + rows
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in keys:
        pts = [(_value(r, "rollout/env_steps"), _value(r, key)) for r in kept]
        pts = [(x, y) for x, y in pts if not (math.isnan(x) or math.isnan(y))]
        if pts:
            xy = np.array(pts)
            out[key] = (xy[:, 0], xy[:, 1])
    return out


def read_rows_of(version: Path) -> list[dict[str, str]]:
    """The training rows (those with ``rollout/env_steps``) of one ``logs/version_N`` folder."""
    path = version / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if (r.get("rollout/env_steps") or "").strip()]


def _value(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


# ------------------------------------------------------------------------------------------ DRIML-ada's horizons
def _k_keys() -> list[str]:
    return [f"horizon/k_frac_{j}" for j in range(K_BINS)] + [f"horizon/k_frac_over{K_BINS - 1}"]


def horizon_runs(runs: Sequence[Run]) -> list[Run]:
    """The DRIML-ada runs that logged their horizons."""
    return [r for r in runs if r.method == "DRIML-ada" and "horizon/k_frac_1" in series(r, ["horizon/k_frac_1"])]


def horizon_stats(run: Run) -> dict[str, float]:
    """A run's horizons over the whole run and over its last 10% of env steps: the mean k (of the anchors with a
    later frame, k >= 1), the shares of k = 1, k >= 2, k >= 5, and the largest k logged with a share above 0."""
    s = series(run, _k_keys())
    x = s["horizon/k_frac_1"][0]
    fracs = np.stack([np.interp(x, *s[k]) if k in s else np.zeros_like(x) for k in _k_keys()], axis=1)
    ks = np.arange(fracs.shape[1], dtype=float)  # the last bin (over 13) is counted as 14
    out: dict[str, float] = {}
    for tag, rows in (("run", np.ones_like(x, bool)), ("last10", x >= 0.9 * x.max())):
        f = fracs[rows].mean(0)
        positive = f[1:].sum()
        out[f"{tag}_mean_k"] = float((f[1:] * ks[1:]).sum() / positive) if positive else math.nan
        out[f"{tag}_k1"] = float(f[1] / positive) if positive else math.nan
        out[f"{tag}_k2plus"] = float(f[2:].sum() / positive) if positive else math.nan
        out[f"{tag}_k5plus"] = float(f[5:].sum() / positive) if positive else math.nan
    seen = np.nonzero(fracs.max(0) > 0)[0]
    out["max_k"] = float(seen.max()) if seen.size else math.nan
    return out


def horizon_table(runs: Sequence[Run]) -> list[str]:
    """The report's "DRIML-ada's horizons" section (markdown lines), empty without such runs."""
    ada = horizon_runs(runs)
    if not ada:
        return []
    lo, hi = PAPER_MEAN_K
    lines = [
        "", "## DRIML-ada's horizons", "",
        "The effective k of the InfoNCE positives (`horizon/k_frac_<k>`; k = 0, an episode's last transition, is "
        f"left out). Mean k is over the anchors with k >= 1; the paper's DRIML-ada figures show a batch-mean k of "
        f"{lo}-{hi}.",
        "", "| run | seed | mean k (run / last 10%) | k = 1 | k >= 2 | k >= 5 | largest k | final score |",
        "|---" * 8 + "|",
    ]  # fmt: skip
    for r in ada:
        h = horizon_stats(r)
        lines.append(f"| {r.path} | {r.seed} | {h['run_mean_k']:.2f} / {h['last10_mean_k']:.2f} "
                     f"| {h['run_k1']:.2f} | {h['run_k2plus']:.2f} | {h['run_k5plus']:.3f} | {h['max_k']:.0f} "
                     f"| {r.final_score:.3f} |")  # fmt: skip
    return lines


def plot_horizons(game: str, runs: Sequence[Run], path: Path) -> Path:
    """Left: the share of each k over env steps (mean over the runs; k >= 5 pooled). Right: each run's mean k, with
    the paper's band."""
    fig = _figure(11.0, 4.2)
    left, right = fig.subplots(1, 2)
    data = [series(r, _k_keys()) for r in runs]
    grid = np.linspace(0, max(d["horizon/k_frac_1"][0].max() for d in data), 120)

    def share(d: dict[str, tuple[np.ndarray, np.ndarray]], keys: list[str]) -> np.ndarray:
        return sum((np.interp(grid, *d[k]) for k in keys if k in d), np.zeros_like(grid))

    groups = [("k = 0 (episode end)", [_k_keys()[0]])] + [(f"k = {j}", [_k_keys()[j]]) for j in range(1, 5)]
    groups.append(("k >= 5", _k_keys()[5:]))
    stacks = [np.mean([share(d, keys) for d in data], axis=0) for _, keys in groups]
    left.stackplot(grid, stacks, labels=[g for g, _ in groups], alpha=0.85)
    left.set(title=f"{game}, DRIML-ada: share of each horizon k ({len(runs)} runs' mean)", xlabel="env steps",
             ylabel="share of the batch", ylim=(0, 1))  # fmt: skip
    left.legend(fontsize="small", loc="lower right")
    ks = np.arange(K_BINS + 1, dtype=float)
    for r, d in zip(runs, data, strict=True):
        x = d["horizon/k_frac_1"][0]
        f = np.stack([np.interp(x, *d[k]) if k in d else np.zeros_like(x) for k in _k_keys()], axis=1)
        positive = f[:, 1:].sum(1)
        mean_k = np.where(positive > 0, (f[:, 1:] * ks[1:]).sum(1) / np.maximum(positive, 1e-12), np.nan)
        right.plot(x, mean_k, linewidth=1.2, label=f"seed {r.seed} (final score {r.final_score:.2f})")
    right.axhspan(*PAPER_MEAN_K, color="0.5", alpha=0.2, label="paper's figures: batch-mean k 1.3-3.1")
    right.set(title="mean k of the anchors with a later frame", xlabel="env steps", ylabel="mean k")
    right.legend(fontsize="small", loc="best")
    for ax in (left, right):
        format_env_steps(ax)
        ax.grid(alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ probes
SMOOTH = 9  # logging steps in the probes' running mean (one minibatch each: noisy)


def smooth(y: np.ndarray, window: int = SMOOTH) -> np.ndarray:
    """The running mean of ``window`` values centred on each (fewer at the ends), same length as ``y``."""
    if y.size == 0:
        return y
    half = window // 2
    c = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.clip(np.arange(y.size) - half, 0, y.size)
    hi = np.clip(np.arange(y.size) + half + 1, 0, y.size)
    return (c[hi] - c[lo]) / (hi - lo)


def probe_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs that logged ``probe/*`` (``model.probe``)."""
    return [r for r in runs if series(r, ["probe/q_mean"])]


def probe_table(runs: Sequence[Run]) -> list[str]:
    """The report's "Probes" section (markdown lines), empty without probed runs: per run, the median of each probe
    over the first and the second half of the env steps it reached."""
    probed = probe_runs(runs)
    if not probed:
        return []
    cols = [("probe/grad_encoder_c51", "grad norm C51", 2), ("probe/grad_encoder_gg", "grad norm InfoNCE GG", 2),
            ("probe/grad_cos_c51_gg", "cos", 3), ("probe/action_gap", "action gap", 3),
            ("probe/greedy_entropy", "greedy entropy", 2)]  # fmt: skip
    lines = [
        "", "## Probes (`model.probe`)", "",
        "Per run, the median of each probe over the first / the second half of the env steps it reached: the encoder's "
        "gradient norm from C51 and from lambda * InfoNCE GG, their cosine, the action gap and the greedy actions' "
        "entropy (nats; log 15 = 2.71 is uniform). docs/running.md defines them.", "",
        "| run | method | seed | final score | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (4 + len(cols)) + "|",
    ]  # fmt: skip
    for r in probed:
        s = series(r, [c[0] for c in cols])
        half = r.max_env_steps / 2
        cells = []
        for key, _, digits in cols:
            if key not in s:
                cells.append("—")
                continue
            x, y = s[key]
            a, b = np.median(y[x < half]) if (x < half).any() else math.nan, np.median(y[x >= half])
            cells.append(f"{a:.{digits}f} / {b:.{digits}f}")
        lines.append(f"| {r.path} | {r.method} | {r.seed} | {r.final_score:.3f} | " + " | ".join(cells) + " |")
    return lines


def plot_probes(game: str, runs: Sequence[Run], path: Path) -> Path:
    """A column per method, a row per probe; each run a line coloured by its final score (one scale for all)."""
    methods = [m for m in METHODS if any(r.method == m for r in runs)]
    scores = [r.final_score for r in runs if not math.isnan(r.final_score)]
    norm = Normalize(min(scores, default=0.0), max(scores, default=1.0))
    cmap = colormaps["viridis"]
    fig = _figure(3.3 * len(methods) + 1.2, 2.0 * len(PROBES) + 0.6)
    axes = np.asarray(fig.subplots(len(PROBES), len(methods), sharex=True, sharey="row", squeeze=False))
    for j, method in enumerate(methods):
        for r in (r for r in runs if r.method == method):
            s = series(r, [k for k, _ in PROBES])
            for i, (key, _) in enumerate(PROBES):
                if key in s:
                    x, y = s[key]
                    axes[i, j].plot(x, smooth(y), color=cmap(norm(r.final_score)), linewidth=1.0,
                                    label=f"seed {r.seed}: {r.final_score:.2f}")  # fmt: skip
        axes[0, j].set_title(method)
        axes[-1, j].set_xlabel("env steps")
        drawn = next((ax for ax in axes[:, j] if ax.lines), None)
        if drawn is not None:
            drawn.legend(fontsize="x-small", loc="best", title="final score", title_fontsize="x-small")
    for i, (_, label) in enumerate(PROBES):
        axes[i, 0].set_ylabel(label, fontsize="small")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            format_env_steps(ax, nbins=4)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="final score", shrink=0.5)
    fig.suptitle(f"{game}: probes on logging steps (model.probe; running mean of {SMOOTH}), each run coloured by its "
                 "final score")  # fmt: skip
    return _save(fig, path)
