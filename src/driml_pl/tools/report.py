"""`python -m driml_pl report RUN_DIR... [--out DIR]`: our final scores and learning curves next to the paper's table.

A run directory is what the trainer writes: ``RUN/logs/version_N/{config.yaml,metrics.csv}``, one ``version_N`` per
start or resume. The report compares each (game, method) cell, averaged over seeds, with the paper's v3 table
(spec §7.1) and lists every gap in the data explicitly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from driml_pl.envs import GAMES
from driml_pl.tools.runs import (  # noqa: F401 (the names the report has always offered)
    FINAL_FRACTION,
    METHODS,
    PAPER_TABLE,
    RANDOM_RETURNS,
    Run,
    Unfinished,
    classify,
    find_run_dirs,
    load_run,
    normalised_scores,
)


def _fmt(values: Sequence[float], note: str = "") -> str:
    """A table cell: mean±std over the runs and how many, then ``note`` (the `Unfinished.note` of the cell's runs);
    without values "—", or, where the cell's runs are all unfinished and left out, "— (no finished seed; note)"."""
    if not values:
        return f"— (no finished seed; {note})" if note else "—"
    seeds = f"{len(values)} seed{'s' if len(values) != 1 else ''}"
    return f"{np.mean(values):.2f}±{np.std(values):.2f} ({seeds}{'; ' + note if note else ''})"


def _tag(run: Run) -> str:
    return f"{run.path} ({run.game}, {run.method}, seed {run.seed})"


def _markdown(runs: Sequence[Run], unfinished: Unfinished) -> str:
    scored = [r for r in runs if r.env_steps.size]
    methods = [m for m in METHODS if any(r.method == m for r in scored)]
    games = [g for g in GAMES if any(r.game == g for r in runs)]
    pools = {(g, m): [r for r in scored if r.game == g and r.method == m] for g in games for m in methods}
    cells = {key: [r.final_score for r in unfinished.counted(pool)] for key, pool in pools.items()}
    lines = [
        "# DRIML-PL results vs the paper (v3 table, 50M env steps)", "",
        f"Each cell: ours mean±std over seeds (np.std, ddof=0) of each run's mean `rollout/episode_return` over the "
        f"last {FINAL_FRACTION:.0%} of the env steps it reached / paper mean±std. A run is finished when its logs "
        "reach its budget (`data.total_env_steps`, within one logging interval); unfinished runs are left out unless "
        "`--include-unfinished`, and a cell counts those it left out (or holds). Norm. score (spec §7.1): ours over "
        "the methods present / the paper's over the same methods and games.", "",
        "| Env | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|",
    ]  # fmt: skip
    for g in games:
        row = [_fmt(cells[g, m], unfinished.note(pools[g, m])) + " / {:.2f}±{:.2f}".format(*PAPER_TABLE[g][m])
               for m in methods]  # fmt: skip
        lines.append(f"| {g} | " + " | ".join(row) + " |")
    notes: list[str] = []
    complete = [g for g in games if all(cells[g, m] for m in methods)]
    if len(complete) < len(games):
        notes.append(f"Norm. score uses only the {len(complete)} games with a number for every method: {complete}")
    norms: list[dict[str, float] | None] = []
    for who, table in (
        ("ours", {g: {m: float(np.mean(cells[g, m])) for m in methods} for g in complete}),
        ("paper", {g: {m: PAPER_TABLE[g][m][0] for m in methods} for g in complete}),
    ):
        try:
            norms.append(normalised_scores(table, methods))
        except ValueError as err:
            norms.append(None)
            notes.append(f"Norm. score ({who}) not computed: {err}")
    norm = [" / ".join(f"{n[m]:.2f}" if n else "n/a" for n in norms) for m in methods]
    lines += [f"| **Norm. score** | {' | '.join(norm)} |", "", "## Missing data", ""]
    for g in games:
        absent = [m for m in methods if not pools[g, m]]
        if absent:
            notes.append(f"{g}: no runs for {', '.join(absent)}")
        short = [m for m in methods if pools[g, m] and not cells[g, m]]
        if short:
            notes.append(f"{g}: only unfinished runs for {', '.join(short)}, left out")
    most = max((len(v) for v in cells.values()), default=0)
    for g, m in cells:
        if 0 < len(cells[g, m]) < most:
            notes.append(f"{g} / {m}: {len(cells[g, m])} seeds (max {most})")
    fate = "averaged in (`--include-unfinished`)" if unfinished.included else "left out"
    for r in runs:
        tag = _tag(r)
        if not r.env_steps.size:
            notes.append(f"{tag}: no rollout/episode_return logged; not in the table")
        elif r.path in unfinished.paths:
            notes.append(f"{tag}: {unfinished.progress(r)}; {fate}")
        if r.superseded:
            notes.append(f"{tag}: {r.superseded} rows logged before a resume were redone after it and dropped")
    lines += [f"- {n}" for n in notes] or ["None."]
    lines += ["", "## Runs", "", "| run | game | method | seed | final score | env steps / budget |", "|---" * 6 + "|"]
    for r in runs:
        budget = f"{r.total_env_steps:,}" if r.total_env_steps is not None else "?"
        lines.append(f"| {r.path} | {r.game} | {r.method} | {r.seed} | {r.final_score:.3f} "
                     f"| {r.max_env_steps:,.0f} / {budget} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _parse_random(values: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for value in values:
        game, _, number = value.partition("=")
        if game not in GAMES:
            raise ValueError(f"--random-return {value!r}: {game!r} is not a Procgen game; valid: {', '.join(GAMES)}")
        try:
            out[game] = float(number)
        except ValueError:
            raise ValueError(f"--random-return {value!r}: {number!r} is not a number (GAME=RETURN)") from None
    return out


def truncate(run: Run, env_steps: int) -> Run:
    """The run as if its logs stopped at ``env_steps`` (rows past it dropped; the budget is kept)."""
    keep = run.env_steps <= env_steps
    return replace(run, env_steps=run.env_steps[keep], returns=run.returns[keep])


def _headlines(unfinished: Unfinished, up_to: int | None) -> list[str]:
    """The notes under the report's title: ``--up-to``, and which runs the numbers use when some are unfinished or
    ``--include-unfinished`` was given."""
    lines: list[str] = []
    point = "the budget"
    if up_to is not None:
        lines.append(f"**Scored on the logs up to {up_to:,} env steps** (`--up-to`): rows past it are ignored, so runs "
                     "that stopped at different points compare at equal env steps; a run that reached that point "
                     "counts as finished for this comparison.")  # fmt: skip
        point = f"the budget or {up_to:,} env steps (whichever is lower)"
    here = f"{len(unfinished.paths)} here, listed under Missing data"
    if unfinished.included:
        lines.append(f"**Unfinished runs included** (`--include-unfinished`): runs short of {point} are averaged in, "
                     f"scored on the env steps they reached ({here}); a cell says how many it holds.")  # fmt: skip
    elif unfinished.paths:
        lines.append(f"**Finished runs only**: runs short of {point} are left out of the table, the intervals and "
                     f"their figures ({here}); a cell says how many it left out. `--include-unfinished` averages "
                     "them in.")  # fmt: skip
    return lines


def write_report(
    runs: Sequence[Run], out_dir: str | Path, random_returns: Mapping[str, float] | None = None, reps: int = 2000,
    up_to: int | None = None, include_unfinished: bool = False,
) -> list[Path]:  # fmt: skip
    """Write ``report.md`` (the paper table, interval estimates, missing data), ``intervals.json`` and the PNGs:
    ``curves_<game>.png`` per game with logged returns, and per normalisation ``intervals_<norm>.png``,
    ``profiles_<norm>.png``, ``sample_efficiency_<norm>.png``, plus ``improvement.png`` with C51 and another method,
    and where the runs logged them DRIML-ada's ``horizons_<game>.png`` (with a table in report.md) and
    ``probes_<game>.png`` (`driml_pl.tools.report_diagnostics`).

    The table and every statistic use the finished runs only (`Unfinished`: with ``up_to``, a run that reached it
    is finished), unless ``include_unfinished``; one line on stderr lists the unfinished runs. ``curves_<game>.png``
    draws every run's logs. Returns the written paths."""
    import json

    from driml_pl.tools import report_diagnostics as diag
    from driml_pl.tools import report_figures as figs
    from driml_pl.tools.report_intervals import interval_section, random_return

    given = dict(random_returns or {})
    if up_to is not None:
        runs = [truncate(r, up_to) for r in runs]
    unfinished = Unfinished.among(runs, up_to, include_unfinished)
    short = [r for r in runs if r.path in unfinished.paths]
    if short:
        fate = "averaged in (--include-unfinished)"
        if not include_unfinished:
            fate = "left out of the table and the intervals (--include-unfinished averages them in)"
        print(f"driml_pl report: {len(short)} unfinished run(s) {fate}: "
              + "; ".join(f"{_tag(r)} {unfinished.progress(r)}" for r in short), file=sys.stderr)  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    section, results, per_game = interval_section(runs, given, reps, unfinished)
    title, _, rest = _markdown(runs, unfinished).partition("\n\n")
    table = "\n\n".join([title, *_headlines(unfinished, up_to), rest])
    head, sep, tail = table.partition("\n## Missing data")
    section = [*section, *diag.horizon_table(runs), *diag.probe_table(runs)]
    written = [out / "report.md", out / "intervals.json"]
    written[0].write_text(head + "\n".join(section) + "\n" + sep + tail, encoding="utf-8")
    left = [{"path": str(r.path), "game": r.game, "method": r.method, "seed": r.seed, "env_steps": r.max_env_steps,
             "compared_at": r.compared_at(up_to)} for r in short]  # fmt: skip
    blob = {"reps": reps, "unfinished": {"included": include_unfinished, "up_to": up_to, "runs": left},
            "per_game": per_game, **{n: r.to_json() for n, r in results.items()}}  # fmt: skip
    written[1].write_text(json.dumps(blob, indent=1) + "\n", encoding="utf-8")
    for game in GAMES:
        game_runs = [r for r in runs if r.game == game and r.env_steps.size]
        if game_runs:
            known = random_return(game, game_runs, given)
            written.append(figs.plot_game(game, game_runs, None if known is None else known[0],
                                          out / f"curves_{game}.png", unfinished.paths))  # fmt: skip
            ada = diag.horizon_runs(game_runs)
            if ada:
                written.append(diag.plot_horizons(game, ada, out / f"horizons_{game}.png"))
            probed = diag.probe_runs(game_runs)
            if probed:
                written.append(diag.plot_probes(game, probed, out / f"probes_{game}.png"))
    labels = {"minmax": "min-max over methods", "random": "0 = random, 1 = paper C51"}
    for norm, res in results.items():
        written.append(figs.plot_intervals(res, labels[norm], out / f"intervals_{norm}.png"))
        written.append(figs.plot_profiles(res, labels[norm], out / f"profiles_{norm}.png"))
        if res.curve_steps is not None:
            written.append(figs.plot_sample_efficiency(res, labels[norm], out / f"sample_efficiency_{norm}.png"))
    if results:
        res = next(iter(results.values()))
        if res.improvement:
            written.append(figs.plot_improvement(res, out / "improvement.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m driml_pl report RUN_DIR... [--out DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="driml_pl report", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("run_dirs", nargs="+", help="run directories, or folders holding several")
    parser.add_argument("--out", default="report", help="where report.md and the PNGs go (default: ./report)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples per interval (default 2000)")
    parser.add_argument(
        "--up-to",
        type=int,
        default=None,
        metavar="ENV_STEPS",
        help="score every run on its logs up to ENV_STEPS (compare unfinished runs at equal env steps)",
    )
    parser.add_argument(
        "--include-unfinished",
        action="store_true",
        help="average unfinished runs (short of their budget, or of --up-to) into the table and the intervals, "
        "marked; by default they are left out",
    )
    parser.add_argument("--random-return", action="append", default=[], metavar="GAME=RETURN",
                        help="a random policy's mean return on GAME (0 of the fixed-reference normalisation; "
                        "overrides the built-in table)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.reps < 100:
            raise ValueError(f"--reps {args.reps} is not allowed: at least 100 bootstrap resamples")
        given = _parse_random(args.random_return)
        if args.up_to is not None and args.up_to <= 0:
            raise ValueError(f"--up-to {args.up_to} is not allowed: a positive number of env steps")
        runs = [load_run(d) for d in find_run_dirs(args.run_dirs)]
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"driml_pl: error: {err}", file=sys.stderr)
        return 2
    for path in write_report(runs, args.out, given, args.reps, args.up_to, args.include_unfinished):
        print(path)
    return 0
