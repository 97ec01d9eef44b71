"""Interval estimates for `driml_pl report`, computed by ``rliable`` (Agarwal et al., NeurIPS 2021).

Scores: a run's score is its final score (`driml_pl.tools.report.Run.final_score`). For a set of games, each method's
scores form a ``(runs, games)`` matrix; a method with more seeds on one game than on another keeps, on every game,
the lowest seeds up to its smallest count (the stratified bootstrap needs the same number of runs per game).

Normalisations (per game, applied to every run's score and to every point of its curve):

- ``minmax``, the paper's (spec §7.1): ``(x - lo) / (hi - lo)`` where lo and hi are the lowest and highest *method
  mean* on that game, over the methods in the report. The worst method's mean is 0, the best's 1; single runs can fall
  outside [0, 1]. It moves when a method is added or dropped, and with two methods it only says which one is ahead
  and by how many gaps. (The paper's row also divides by C51's average; the intervals here do not.)
- ``random``, fixed references: ``(x - random) / (paper_c51 - random)``: 0 is a uniformly random policy's return
  on the run's level set, 1 is the paper's C51 after 50M env steps (its table). Games without a known random return
  for the runs' level set are left out of this normalisation (and named in the report).

Intervals: rliable's stratified bootstrap resamples runs (seeds) with replacement *within each game*, never the
games themselves (``task_bootstrap=False``), and reports percentile 95% intervals. They answer "what if the seeds
were drawn again on these games", not "on other games". The probability of improvement P(X > C51) is the
Mann-Whitney U statistic over each game's run pairs, averaged over games; its interval resamples each method's runs
independently (rliable's ``StratifiedIndependentBootstrap``). It does not depend on the normalisation.
With fewer than 2 runs of a method on a game there is no interval (``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from rliable import library as rly
from rliable import metrics
from scipy import stats

AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "IQM": metrics.aggregate_iqm,
    "mean": metrics.aggregate_mean,
    "median": metrics.aggregate_median,
    "optimality gap": metrics.aggregate_optimality_gap,
}
"""rliable's aggregate metrics over a (runs, games) matrix; the optimality gap is 1 - mean(min(score, 1))."""
NORMALISATIONS = ("minmax", "random")
BASELINE = "C51"

Estimate = tuple[float, tuple[float, float] | None]
"""A point estimate and its 95% interval (None: fewer than 2 runs)."""


@dataclass
class Intervals:
    """Everything the report prints for one normalisation (or for raw returns on one game).

    Attributes:
        games: the games in the matrices, in order.
        runs: {method: number of runs per game used}.
        aggregates: {method: {metric: (point, interval)}}.
        improvement: {method: P(method > C51) (point, interval)} for every non-C51 method.
        profile_taus, profiles, profile_cis: performance profiles: the fraction of runs (over all games) whose
            normalised score exceeds tau, with their bands (None: fewer than 2 runs).
        curve_steps, curves, curve_cis: IQM of the normalised curves at each env-step point, with bands.
    """

    games: list[str]
    runs: dict[str, int]
    aggregates: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    improvement: dict[str, Estimate] = field(default_factory=dict)
    profile_taus: np.ndarray | None = None
    profiles: dict[str, np.ndarray] = field(default_factory=dict)
    profile_cis: dict[str, np.ndarray | None] = field(default_factory=dict)
    curve_steps: np.ndarray | None = None
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    curve_cis: dict[str, np.ndarray | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain lists and floats (for ``intervals.json``)."""

        def est(e: Estimate) -> dict[str, Any]:
            return {"point": e[0], "ci": None if e[1] is None else list(e[1])}

        def arr(a: np.ndarray | None) -> Any:
            return None if a is None else np.asarray(a).tolist()

        return {
            "games": self.games, "runs": self.runs,
            "aggregates": {m: {k: est(v) for k, v in d.items()} for m, d in self.aggregates.items()},
            "improvement_over_C51": {m: est(v) for m, v in self.improvement.items()},
            "profile_taus": arr(self.profile_taus), "profiles": {m: arr(v) for m, v in self.profiles.items()},
            "profile_cis": {m: arr(v) for m, v in self.profile_cis.items()},
            "curve_env_steps": arr(self.curve_steps), "curves": {m: arr(v) for m, v in self.curves.items()},
            "curve_cis": {m: arr(v) for m, v in self.curve_cis.items()},
        }  # fmt: skip


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with numpy's global generator seeded (rliable's bootstrap draws from it), then restore it."""
    state = np.random.get_state()  # noqa: NPY002 (rliable draws from the legacy global generator)
    np.random.seed(seed)  # noqa: NPY002
    try:
        return fn()
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _interval(ci: np.ndarray) -> tuple[float, float]:
    flat = np.asarray(ci, dtype=np.float64).reshape(2, -1)
    return float(flat[0, 0]), float(flat[1, 0])


def aggregate(scores: np.ndarray, reps: int, seed: int = 0) -> dict[str, Estimate]:
    """IQM, mean, median and optimality gap of a (runs, games) matrix with stratified-bootstrap 95% intervals (one
    bootstrap for the four: each resample gives all of them)."""

    def all_four(s: np.ndarray) -> np.ndarray:
        return np.array([fn(s) for fn in AGGREGATES.values()])

    points = all_four(scores)
    if scores.shape[0] < 2:
        return {name: (float(p), None) for name, p in zip(AGGREGATES, points, strict=True)}
    _, cis = _seeded(seed, lambda: rly.get_interval_estimates({"x": scores}, all_four, reps=reps))
    ci = np.asarray(cis["x"])
    return {name: (float(points[i]), (float(ci[0, i]), float(ci[1, i]))) for i, name in enumerate(AGGREGATES)}


def improvement(x: np.ndarray, y: np.ndarray, reps: int, seed: int = 0) -> Estimate:
    """P(X > Y) over (runs, games) matrices of the same games, with its 95% interval (None under 2 runs each)."""
    point = float(metrics.probability_of_improvement(x, y))
    if min(x.shape[0], y.shape[0]) < 2:
        return point, None
    _, cis = _seeded(seed, lambda: rly.get_interval_estimates({"xy": [x, y]}, metrics.probability_of_improvement,
                                                              reps=reps))  # fmt: skip
    return point, _interval(cis["xy"])


def _above(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """rliable's score distribution (``run_score_deviation`` at every tau), vectorised over the taus."""
    return (np.asarray(scores)[..., None] > np.asarray(taus)).reshape(-1, len(taus)).mean(axis=0)


def profiles(
    scores: Mapping[str, np.ndarray], taus: np.ndarray, reps: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Performance profiles (fraction of runs above each tau) with bands; no band for a method with one run."""
    points: dict[str, np.ndarray] = {}
    bands: dict[str, np.ndarray | None] = {}
    for i, (method, s) in enumerate(scores.items()):
        if s.shape[0] < 2:
            points[method], bands[method] = _above(s, taus), None
            continue
        run = partial(rly.create_performance_profile, {"x": s}, taus, reps=reps, custom_profile_func=_above)
        p, c = _seeded(seed + i, run)
        points[method], bands[method] = np.asarray(p["x"]), np.asarray(c["x"])
    return points, bands


def _iqm_per_point(s: np.ndarray) -> np.ndarray:
    """`metrics.aggregate_iqm` (scipy's 25% trimmed mean over runs x games) at every point, vectorised."""
    return np.asarray(stats.trim_mean(s.reshape(-1, s.shape[-1]), 0.25, axis=0))


def iqm_curves(
    curves: Mapping[str, np.ndarray], reps: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """IQM at each point of (runs, games, points) arrays, with bands (None for a method with one run)."""
    points: dict[str, np.ndarray] = {}
    bands: dict[str, np.ndarray | None] = {}
    for i, (method, c) in enumerate(curves.items()):
        points[method] = _iqm_per_point(c)
        if c.shape[0] < 2:
            bands[method] = None
            continue
        _, cis = _seeded(seed + i, partial(rly.get_interval_estimates, {"x": c}, _iqm_per_point, reps=reps))
        bands[method] = np.asarray(cis["x"])
    return points, bands


def normalise(scores: np.ndarray, games: Sequence[str], lo: Mapping[str, float], hi: Mapping[str, float]) -> np.ndarray:
    """``(x - lo[g]) / (hi[g] - lo[g])`` along axis 1 (games) of a (runs, games, ...) array; 0 where hi == lo."""
    out = np.empty_like(scores, dtype=np.float64)
    for j, game in enumerate(games):
        span = hi[game] - lo[game]
        out[:, j] = (scores[:, j] - lo[game]) / span if span != 0 else 0.0
    return out


def estimate_all(
    finals: Mapping[str, np.ndarray], curves: Mapping[str, np.ndarray] | None, curve_steps: np.ndarray | None,
    games: Sequence[str], reps: int, seed: int = 0,
) -> Intervals:  # fmt: skip
    """Aggregates, P(improvement) over C51, profiles and IQM curves for (runs, games) matrices already normalised."""
    result = Intervals(list(games), {m: int(s.shape[0]) for m, s in finals.items()})
    for method, s in finals.items():
        result.aggregates[method] = aggregate(s, reps, seed)
        if method != BASELINE and BASELINE in finals:
            result.improvement[method] = improvement(s, finals[BASELINE], reps, seed)
    every = np.concatenate([s.ravel() for s in finals.values()])
    top = max(1.0, float(np.nanmax(every))) if every.size else 1.0
    low = min(0.0, float(np.nanmin(every))) if every.size else 0.0
    result.profile_taus = np.linspace(low, top, 41)
    result.profiles, result.profile_cis = profiles(finals, result.profile_taus, reps, seed)
    if curves is not None and curve_steps is not None:
        result.curve_steps = curve_steps
        result.curves, result.curve_cis = iqm_curves(curves, reps, seed)
    return result
