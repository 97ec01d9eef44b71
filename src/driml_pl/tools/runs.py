"""Runs as the report reads them: the paper's table (spec §7.1), the method a run's config is, and a run's logged
returns (every ``logs/version_*/metrics.csv`` of its directory). The report, its figures and intervals, the plots
and the grid launcher all read runs through here."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from driml_pl.envs import GAMES

METHODS: tuple[str, ...] = ("C51", "CPC-1→5", "CURL", "DRIML-noact", "DRIML-randk", "DRIML-fix", "DRIML-ada")
_PAPER_ROWS: dict[str, tuple[tuple[float, float], ...]] = {
    "bigfish": ((1.33, 0.12), (1.17, 0.16), (2.7, 1.3), (1.19, 0.04), (1.12, 1.03), (2.02, 0.18), (4.45, 0.71)),
    "bossfight": ((0.57, 0.05), (0.52, 0.07), (0.6, 0.06), (0.47, 0.01), (0.56, 0.03), (0.67, 0.02), (1.05, 0.19)),
    "caveflyer": ((9.19, 0.29), (6.4, 0.56), (6.94, 0.25), (8.26, 0.26), (7.92, 0.15), (10.18, 0.41), (6.77, 0.04)),
    "chaser": ((0.22, 0.04), (0.21, 0.02), (0.35, 0.04), (0.23, 0.02), (0.26, 0.01), (0.29, 0.02), (0.38, 0.04)),
    "climber": ((1.68, 0.1), (1.71, 0.11), (1.75, 0.09), (1.57, 0.01), (2.21, 0.48), (2.26, 0.05), (2.2, 0.08)),
    "coinrun": ((29.7, 5.44), (11.4, 1.55), (21.17, 1.94), (13.15, 1.21), (21.55, 1.97), (27.24, 1.92), (22.88, 0.4)),
    "dodgeball": ((1.2, 0.08), (1.05, 0.04), (1.09, 0.04), (1.22, 0.04), (1.19, 0.03), (1.28, 0.02), (1.44, 0.06)),
    "fruitbot": ((3.86, 0.96), (4.56, 0.93), (4.89, 0.71), (5.42, 1.33), (6.84, 0.24), (5.4, 1.02), (9.53, 0.29)),
    "heist": ((1.54, 0.1), (0.93, 0.08), (1.06, 0.05), (1.04, 0.02), (1.0, 0.05), (1.3, 0.05), (1.89, 0.02)),
    "jumper": ((13.22, 0.83), (2.28, 0.44), (10.27, 0.61), (4.31, 0.64), (5.62, 0.27), (12.64, 0.64), (12.16, 0.42)),
    "leaper": ((5.03, 0.14), (4.01, 0.71), (3.94, 0.46), (5.4, 0.09), (4.24, 1.17), (6.17, 0.29), (6.35, 0.46)),
    "maze": ((2.36, 0.09), (1.14, 0.08), (0.82, 0.2), (1.44, 0.26), (1.18, 0.03), (1.38, 0.08), (2.62, 0.1)),
    "miner": ((0.13, 0.01), (0.13, 0.02), (0.1, 0.0), (0.12, 0.01), (0.15, 0.01), (0.14, 0.01), (0.19, 0.02)),
    "ninja": ((9.36, 0.01), (6.23, 0.82), (5.84, 1.21), (6.44, 0.22), (8.13, 0.26), (9.21, 0.25), (8.74, 0.28)),
    "plunder": ((2.99, 0.07), (3.0, 0.06), (2.77, 0.14), (3.2, 0.05), (3.34, 0.09), (3.37, 0.17), (3.58, 0.04)),
    "starpilot": ((2.44, 0.12), (2.87, 0.05), (2.68, 0.09), (3.7, 0.3), (3.93, 0.04), (4.56, 0.21), (2.63, 0.16)),
}
PAPER_TABLE: dict[str, dict[str, tuple[float, float]]] = {
    game: dict(zip(METHODS, row, strict=True)) for game, row in _PAPER_ROWS.items()
}
"""The paper's v3 Procgen table (spec §7.1): {game: {method: (mean, std)}} after 50M env steps."""
FINAL_FRACTION = 0.1  # a run's score averages the last 10% of the env steps it reached
RANDOM_RETURNS: dict[tuple[str, int, int, str], tuple[float, str]] = {
    ("fruitbot", 1, 0, "easy"): (-3.37, "benchmarks/random_policy.py on conf/quickstart.yaml, seed 0, 192k env steps"),
}
"""Mean episode return of a uniformly random policy, by (game, num_levels, start_level, distribution_mode), with its
source: the fixed 0 of the ``random`` normalisation and the plots' random-policy line. Extend with measured values
(``benchmarks/random_policy.py --config ...``) or pass ``report --random-return GAME=VALUE``."""


def normalised_scores(
    table: Mapping[str, Mapping[str, float]], methods: Sequence[str], baseline: str = "C51"
) -> dict[str, float]:
    """The paper's "Norm. score" row, as reconstructed in spec §7.1.

    For each game the scores of ``methods`` are min-max normalised (worst -> 0, best -> 1; a game where all methods
    tie gives 0 to all), then averaged over the games and divided by the baseline's average.

    Args:
        table: {game: {method: score}}; every game must hold every method in ``methods``.
        methods: the methods to normalise across (must include ``baseline``).
        baseline: the method whose average becomes 1.

    Returns:
        {method: normalised score}.

    Raises:
        ValueError: on an empty table, a missing score, a baseline outside ``methods``, or a baseline averaging 0.
    """
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {list(methods)}")
    if not table:
        raise ValueError("no games to normalise over")
    sums = dict.fromkeys(methods, 0.0)
    for game, scores in table.items():
        missing = [m for m in methods if m not in scores]
        if missing:
            raise ValueError(f"game {game!r} has no score for {missing}")
        low, high = min(scores[m] for m in methods), max(scores[m] for m in methods)
        for m in methods:
            sums[m] += (scores[m] - low) / (high - low) if high > low else 0.0
    if sums[baseline] == 0.0:
        raise ValueError(f"the baseline {baseline!r} is the worst method on every game; its average is 0")
    return {m: sums[m] / sums[baseline] for m in methods}


def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def classify(config: Mapping[str, Any]) -> str:
    """Name the paper method a LightningCLI config trains.

    All four λ at 0 is plain C51; ``model.action_conditioned: false`` (absent means true) is DRIML-noact; otherwise
    ``data.horizon.mode`` fixed / random / adaptive gives DRIML-fix / DRIML-randk / DRIML-ada.

    Raises:
        ValueError: if a λ or the horizon mode is missing, or the mode is unknown.
    """
    lambdas = [_get(config, f"model.lambda_{t}") for t in ("ll", "lg", "gl", "gg")]
    if any(v is None for v in lambdas):
        raise ValueError("config lacks one of model.lambda_ll/lg/gl/gg")
    if all(float(v) == 0.0 for v in lambdas):
        return "C51"
    if _get(config, "model.action_conditioned", True) is False:
        return "DRIML-noact"
    mode = _get(config, "data.horizon.mode")
    names = {"fixed": "DRIML-fix", "random": "DRIML-randk", "adaptive": "DRIML-ada"}
    if mode not in names:
        raise ValueError(f"data.horizon.mode must be one of {list(names)}, got {mode!r}")
    return names[mode]


@dataclass
class Run:
    """One training run (all its resumes), reduced to what the report needs.

    Attributes:
        path: the run directory.
        game, method, seed: from the config (method via `classify`).
        total_env_steps: the budget, ``data.total_env_steps``.
        setting: (num_levels, start_level, distribution_mode) of ``data.env``, the key of `RANDOM_RETURNS`.
        env_steps, returns: the ``rollout/env_steps`` and ``rollout/episode_return`` of every row holding both, over
            all versions in order; rows of an earlier version at or past the first env step its resume logged were
            redone after the resume and are dropped (counted in ``superseded``).
    """

    path: Path
    game: str
    method: str
    seed: int | None
    total_env_steps: int | None
    env_steps: np.ndarray
    returns: np.ndarray
    superseded: int = 0
    setting: tuple[int, int, str] | None = None

    @property
    def max_env_steps(self) -> float:
        """The largest env-step count the run logged a return at (0 when none)."""
        return float(self.env_steps.max()) if self.env_steps.size else 0.0

    @property
    def final_score(self) -> float:
        """Mean episode return over the rows with env_steps >= 90% of `max_env_steps` (NaN when nothing logged)."""
        if not self.env_steps.size:
            return math.nan
        return float(self.returns[self.env_steps >= (1.0 - FINAL_FRACTION) * self.max_env_steps].mean())

    @property
    def reached_budget(self) -> bool:
        """Whether the logs reach the budget, allowing one logging interval (the last update is rarely logged)."""
        return self.reaches(self.total_env_steps)

    def reaches(self, env_steps: float | None) -> bool:
        """Whether the logs reach ``env_steps`` (always true for None), allowing one logging interval."""
        if env_steps is None:
            return True
        gaps = np.diff(self.env_steps)
        slack = float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 0.0
        return self.max_env_steps + slack >= env_steps

    def compared_at(self, up_to: int | None) -> int | None:
        """The env steps the run must reach to count as finished: its budget, or ``up_to`` (``report --up-to``)
        where that is lower; None when neither is known."""
        known = [n for n in (self.total_env_steps, up_to) if n is not None]
        return min(known) if known else None


@dataclass(frozen=True)
class Unfinished:
    """The scored runs whose logs stop short of the point they are compared at (`Run.compared_at`), and whether the
    report averages them in (``report --include-unfinished``) or, by default, leaves them out.

    Attributes:
        paths: the unfinished runs' directories.
        included: whether they count like finished runs.
        up_to: ``report --up-to``, if given.
    """

    paths: frozenset[Path] = frozenset()
    included: bool = False
    up_to: int | None = None

    @classmethod
    def among(cls, runs: Iterable[Run], up_to: int | None = None, included: bool = False) -> Unfinished:
        """The unfinished ones among ``runs`` (runs that logged no return are not scored, so not among them)."""
        short = frozenset(r.path for r in runs if r.env_steps.size and not r.reaches(r.compared_at(up_to)))
        return cls(short, included, up_to)

    def counts(self, run: Run) -> bool:
        """Whether the statistics use ``run``: it is scored, and finished or ``included``."""
        return bool(run.env_steps.size) and (self.included or run.path not in self.paths)

    def counted(self, runs: Iterable[Run]) -> list[Run]:
        """The runs the statistics use, in order."""
        return [r for r in runs if self.counts(r)]

    def count(self, runs: Iterable[Run]) -> int:
        """How many of ``runs`` are unfinished."""
        return sum(r.path in self.paths for r in runs)

    def note(self, runs: Iterable[Run]) -> str:
        """What a cell of ``runs`` says about its unfinished runs: ``"1 unfinished left out"`` (``"... included"``
        under ``--include-unfinished``), or ``""`` when it has none."""
        k = self.count(runs)
        return f"{k} unfinished {'included' if self.included else 'left out'}" if k else ""

    def progress(self, run: Run) -> str:
        """How far an unfinished run got: ``"reached 140 of 1,000 env steps (14%)"`` (``"(28% of --up-to)"`` where
        ``--up-to`` is the lower of the two)."""
        target = run.compared_at(self.up_to)
        assert target, "an unfinished run has a point to reach"
        of = " of --up-to" if self.up_to == target and target != run.total_env_steps else ""
        return f"reached {run.max_env_steps:,.0f} of {target:,} env steps ({run.max_env_steps / target:.0%}{of})"


def _read_metrics(path: Path) -> tuple[list[float], list[float]]:
    steps: list[float] = []
    returns: list[float] = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step, ret = row.get("rollout/env_steps") or "", row.get("rollout/episode_return") or ""
            if step.strip() and ret.strip():
                steps.append(float(step))
                returns.append(float(ret))
    return steps, returns


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory: the last version's config, and the metrics of all versions in version order."""
    run_dir = Path(run_dir)
    versions = [p for p in (run_dir / "logs").glob("version_*/config.yaml") if p.parent.name[8:].isdigit()]
    versions.sort(key=lambda p: int(p.parent.name[8:]))
    if not versions:
        raise ValueError(f"{run_dir} holds no logs/version_*/config.yaml")
    config = yaml.safe_load(versions[-1].read_text()) or {}
    steps: list[float] = []
    returns: list[float] = []
    superseded = 0
    for version in versions:
        metrics = version.parent / "metrics.csv"
        new_steps, new_returns = _read_metrics(metrics) if metrics.exists() else ([], [])
        if new_steps:
            keep = sum(s < new_steps[0] for s in steps)
            superseded += len(steps) - keep
            steps, returns = steps[:keep] + new_steps, returns[:keep] + new_returns
    game, seed, total = (_get(config, k) for k in ("data.env.game", "seed_everything", "data.total_env_steps"))
    levels, start, mode = (_get(config, f"data.env.{k}") for k in ("num_levels", "start_level", "distribution_mode"))
    setting = None if levels is None else (int(levels), int(start or 0), str(mode or "easy"))
    if game not in GAMES:
        raise ValueError(f"{versions[-1]}: data.env.game {game!r} is not a Procgen game")
    return Run(
        path=run_dir, game=game, method=classify(config), seed=None if seed is None else int(seed),
        total_env_steps=None if total is None else int(total), env_steps=np.asarray(steps, dtype=np.float64),
        returns=np.asarray(returns, dtype=np.float64), superseded=superseded, setting=setting,
    )  # fmt: skip


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is a run directory or a folder holding run directories (at any depth)."""
    found: list[Path] = []
    for path in map(Path, paths):
        configs = sorted(path.glob("logs/version_*/config.yaml")) or sorted(path.rglob("logs/version_*/config.yaml"))
        if not configs:
            raise ValueError(f"no run found under {path} (looked for logs/version_*/config.yaml)")
        for config in configs:
            if config.parents[2] not in found:
                found.append(config.parents[2])
    return found
