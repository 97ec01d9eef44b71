"""The report's interval section: runs -> score matrices -> `driml_pl.tools.intervals` -> markdown (and data to plot).

See `driml_pl.tools.intervals` for the statistics and the two normalisations, and docs/reporting.md for how to read
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from driml_pl.tools.intervals import AGGREGATES, BASELINE, Estimate, Intervals, aggregate, estimate_all, improvement
from driml_pl.tools.intervals import normalise as normalise_matrix
from driml_pl.tools.runs import METHODS, PAPER_TABLE, RANDOM_RETURNS, Run, Unfinished

CURVE_POINTS = 25
NORM_TITLES = {
    "minmax": "min-max over methods (the paper's: per game, 0 = the worst method's mean, 1 = the best's)",
    "random": "fixed references (per game, 0 = a uniformly random policy, 1 = the paper's C51 at 50M env steps)",
}


@dataclass
class Study:
    """The runs as matrices: ``finals[m]`` is (runs, games), ``curves[m]`` (runs, games, points) at ``steps``;
    ``used[m]`` holds the runs behind them per game, ``left_out`` the unfinished runs the statistics do not use."""

    methods: list[str]
    games: list[str]
    finals: dict[str, np.ndarray] = field(default_factory=dict)
    curves: dict[str, np.ndarray] | None = None
    steps: np.ndarray | None = None
    seeds: dict[str, list[list[int | None]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    used: dict[str, list[list[Run]]] = field(default_factory=dict)
    left_out: list[Run] = field(default_factory=list)

    def pool(self, method: str, games: Sequence[str]) -> list[Run]:
        """The runs of ``method`` on ``games`` that the matrices use, then those left out as unfinished."""
        used = [r for g, rs in zip(self.games, self.used[method], strict=True) if g in games for r in rs]
        return used + [r for r in self.left_out if r.method == method and r.game in games]


def random_return(game: str, runs: Sequence[Run], given: Mapping[str, float]) -> tuple[float, str] | None:
    """The random-policy return for ``game``'s runs: ``given`` (``--random-return``) first, else `RANDOM_RETURNS` when
    every run of the game has the same level set; None when unknown."""
    if game in given:
        return given[game], "--random-return"
    settings = {r.setting for r in runs if r.game == game}
    if len(settings) != 1 or None in settings:
        return None
    ((levels, start, mode),) = settings  # type: ignore[misc]
    return RANDOM_RETURNS.get((game, levels, start, mode))


def build_study(runs: Sequence[Run], unfinished: Unfinished | None = None, points: int = CURVE_POINTS) -> Study:
    """Matrices over the games where every method present has a counted run (the lowest seeds, equal per game).

    A run counts when ``unfinished.counts`` it (by default: every scored run)."""
    unfinished = unfinished or Unfinished()
    scored = unfinished.counted(runs)
    methods = [m for m in METHODS if any(r.method == m for r in scored)]
    games = [g for g in PAPER_TABLE if all(any(r.game == g and r.method == m for r in scored) for m in methods)]
    study = Study(methods, games, left_out=[r for r in runs if r.env_steps.size and not unfinished.counts(r)])
    short = [m for m in METHODS if m not in methods and any(r.method == m for r in study.left_out)]
    if short:
        study.notes.append(f"{', '.join(short)}: only unfinished runs, left out of the intervals")
    if not games:
        return study
    used = study.used
    for m in methods:
        per_game = [sorted((r for r in scored if r.game == g and r.method == m), key=lambda r: r.seed or 0)
                    for g in games]  # fmt: skip
        n = min(len(rs) for rs in per_game)
        if any(len(rs) > n for rs in per_game):
            study.notes.append(f"{m}: {n} run(s) per game in the intervals (the lowest seeds; some games have more)")
        used[m] = [rs[:n] for rs in per_game]
        study.finals[m] = np.array([[rs[i].final_score for rs in used[m]] for i in range(n)])
        study.seeds[m] = [[r.seed for r in rs] for rs in used[m]]
    every = [r for rss in used.values() for rs in rss for r in rs]
    lo, hi = max(r.env_steps.min() for r in every), min(r.max_env_steps for r in every)
    if hi > lo:
        study.steps = np.linspace(lo, hi, points)
        study.curves = {m: np.array([[np.interp(study.steps, r.env_steps, r.returns) for r in (rs[i] for rs in rss)]
                                     for i in range(len(rss[0]))]) for m, rss in used.items()}  # fmt: skip
    return study


def normalised(study: Study, norm: str, runs: Sequence[Run], given: Mapping[str, float]) -> tuple[
    list[str], dict[str, np.ndarray], dict[str, np.ndarray] | None, list[str]
]:  # fmt: skip
    """The study's games, finals and curves under ``norm`` (``minmax`` or ``random``), and notes on games left out."""
    games, notes = list(study.games), []
    if norm == "minmax":
        lo = {g: min(float(study.finals[m][:, j].mean()) for m in study.methods) for j, g in enumerate(games)}
        hi = {g: max(float(study.finals[m][:, j].mean()) for m in study.methods) for j, g in enumerate(games)}
    else:
        known = {g: random_return(g, runs, given) for g in games}
        missing = [g for g in games if known[g] is None]
        if missing:
            notes.append(f"no random-policy return known for {', '.join(missing)}: left out of this normalisation")
        games = [g for g in games if known[g] is not None]
        lo = {g: known[g][0] for g in games}  # type: ignore[index]
        hi = {g: PAPER_TABLE[g]["C51"][0] for g in games}
    cols = [study.games.index(g) for g in games]
    finals = {m: normalise_matrix(s[:, cols], games, lo, hi) for m, s in study.finals.items()}
    curves = None
    if study.curves is not None:
        curves = {m: normalise_matrix(c[:, cols], games, lo, hi) for m, c in study.curves.items()}
    return games, finals, curves, notes


def fmt(e: Estimate, runs: int) -> str:
    point, ci = e
    if ci is None:
        return f"{point:.2f} (n={runs}: no interval)"
    return f"{point:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def interval_section(
    runs: Sequence[Run], given: Mapping[str, float], reps: int, unfinished: Unfinished | None = None
) -> tuple[list[str], dict[str, Intervals], dict[str, Any]]:
    """Markdown lines, {normalisation: Intervals} for the figures, and the per-game estimates (for the JSON).

    The statistics use the runs ``unfinished`` counts (default: every scored run); each row says how many unfinished
    runs it left out (or, under ``--include-unfinished``, holds)."""
    unfinished = unfinished or Unfinished()
    study = build_study(runs, unfinished)
    lines = ["", "## Interval estimates (rliable)", ""]
    if not study.games:
        return lines + ["No game has scored runs of every method present: no intervals."], {}, {}
    lines += [
        f"Scores: each run's final score (as in the table). Bootstrap: rliable's stratified bootstrap, {reps:,} "
        "resamples of the runs (seeds) within each game, games fixed; percentile 95% intervals [low, high]. "
        "P(X > C51): Mann-Whitney over each game's run pairs, averaged over games (independent resampling of each "
        "method's runs). A method with fewer than 2 runs gets its point estimate and no interval. "
        "See docs/reporting.md.", "",
    ]  # fmt: skip
    lines += [f"- {n}" for n in study.notes]
    if len(study.games) == 1:
        lines.append(f"- One game ({study.games[0]}): every aggregate below is that game's interval "
                     "(its median and mean coincide).")  # fmt: skip
    results: dict[str, Intervals] = {}
    for norm in ("minmax", "random"):
        games, finals, curves, notes = normalised(study, norm, runs, given)
        lines += ["", f"### Normalised scores: {NORM_TITLES[norm]}", ""] + [f"- {n}" for n in notes]
        if not games:
            lines.append("Not computed: no game with both references.")
            continue
        res = estimate_all(finals, curves, study.steps, games, reps)
        results[norm] = res
        lines += [f"Games: {', '.join(games)}.", "", "| method | runs x games | " + " | ".join(AGGREGATES) + " |",
                  "|---" * (2 + len(AGGREGATES)) + "|"]  # fmt: skip
        for m in study.methods:
            n = res.runs[m]
            cells = [fmt(res.aggregates[m][k], n) for k in AGGREGATES]
            held = _with_note(f"{n} x {len(games)}", unfinished.note(study.pool(m, games)))
            lines.append(f"| {m} | {held} | " + " | ".join(cells) + " |")
    if len(study.methods) > 1 and BASELINE in study.methods and results:
        res = next(iter(results.values()))
        lines += ["", "### Probability of improvement over C51", "",
                  f"Over {', '.join(res.games)}; P = 0.5 is a tie, 1.0 means every run of the method beats every C51 "
                  "run on every game.", "", "| method | P(method > C51) |", "|---|---|"]  # fmt: skip
        for m in study.methods:
            if m != BASELINE:
                lines.append(f"| {m} | {fmt(res.improvement[m], min(res.runs[m], res.runs[BASELINE]))} |")
    per_game, table = _per_game(runs, study, reps, unfinished)
    return lines + table, results, per_game


def _with_note(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


def _per_game(runs: Sequence[Run], study: Study, reps: int, unfinished: Unfinished) -> tuple[dict[str, Any], list[str]]:
    """Per game, all of each method's counted runs, raw episode returns: mean and IQM with intervals, P(> C51). A
    cell whose runs are all left out as unfinished gets a row without numbers."""
    lines = ["", "### Per game (raw episode returns, every run the table counts)", "",
             "| game | method | runs | mean | IQM | P(method > C51) |", "|---" * 6 + "|"]  # fmt: skip
    out: dict[str, Any] = {}
    scored = [r for r in runs if r.env_steps.size]
    for g in PAPER_TABLE:
        pools = {m: [r for r in scored if r.game == g and r.method == m] for m in study.methods}
        cols = {m: np.array([r.final_score for r in unfinished.counted(pool)], dtype=np.float64).reshape(-1, 1)
                for m, pool in pools.items() if pool}  # fmt: skip
        for m, c in cols.items():
            n, note = len(c), unfinished.note(pools[m])
            entry: dict[str, Any] = {"runs": n, "unfinished": unfinished.count(pools[m]), "scores": c[:, 0].tolist()}
            out.setdefault(g, {})[m] = entry
            if not n:
                lines.append(f"| {g} | {m} | {_with_note('0', note)} | — | — | — |")
                continue
            agg = aggregate(c, reps)
            base = cols.get(BASELINE)
            p: Estimate | None = None
            pc = "—"
            if m != BASELINE and base is not None and base.size:
                p = improvement(c, base, reps)
                pc = fmt(p, min(n, len(base)))
            lines.append(f"| {g} | {m} | {_with_note(str(n), note)} | {fmt(agg['mean'], n)} | {fmt(agg['IQM'], n)} "
                         f"| {pc} |")  # fmt: skip
            entry.update({k: {"point": agg[k][0], "ci": agg[k][1]} for k in ("mean", "IQM")})
            entry["improvement_over_C51"] = None if p is None else {"point": p[0], "ci": p[1]}
    return out, lines
