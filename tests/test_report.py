"""`driml_pl report`: the paper table and its normalisation, run classification, and a report over synthetic runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import stats

from driml_pl.envs import GAMES
from driml_pl.tools.intervals import estimate_all, normalise
from driml_pl.tools.report import METHODS, PAPER_TABLE, Run, classify, load_run, main, normalised_scores


def test_paper_table_shape() -> None:
    assert list(PAPER_TABLE) == list(GAMES)
    assert all(list(row) == list(METHODS) for row in PAPER_TABLE.values())
    assert PAPER_TABLE["coinrun"]["C51"] == (29.7, 5.44)
    assert PAPER_TABLE["bigfish"]["DRIML-ada"] == (4.45, 0.71)
    assert PAPER_TABLE["starpilot"]["DRIML-fix"] == (4.56, 0.21)
    assert PAPER_TABLE["miner"]["CURL"] == (0.1, 0.0)


def test_normalisation_reproduces_the_paper_row() -> None:
    means = {game: {m: ms[0] for m, ms in row.items()} for game, row in PAPER_TABLE.items()}
    scores = normalised_scores(means, list(METHODS))
    got = [scores[m] for m in METHODS]
    # The reconstruction (spec §7.1) gives 0.2197 for CPC and 1.8885 for ada against the printed 0.23 and 1.9: the
    # printed row was presumably computed from unrounded means, so those two sit 0.010-0.012 off.
    np.testing.assert_allclose(got, [1.0, 0.23, 0.52, 0.59, 0.92, 1.48, 1.9], atol=0.012)
    assert [round(x, 2) for x in got] == [1.0, 0.22, 0.52, 0.59, 0.92, 1.48, 1.89]
    without_randk = normalised_scores(means, [m for m in METHODS if m != "DRIML-randk"])
    assert abs(without_randk["DRIML-fix"] - 1.48) < 0.01 and abs(without_randk["DRIML-noact"] - 0.59) < 0.01


def test_normalisation_by_hand_and_errors() -> None:
    table = {
        "a": {"C51": 2.0, "X": 4.0, "Y": 0.0},
        "b": {"C51": 1.0, "X": 1.0, "Y": 1.0},
        "c": {"C51": 3.0, "X": 0.0, "Y": 1.0},
    }
    # a: C51 0.5, X 1, Y 0; b: all tie -> 0; c: C51 1, X 0, Y 1/3. Sums: C51 1.5, X 1, Y 1/3.
    scores = normalised_scores(table, ["C51", "X", "Y"])
    assert scores == pytest.approx({"C51": 1.0, "X": 2 / 3, "Y": 2 / 9})
    with pytest.raises(ValueError, match="baseline"):
        normalised_scores(table, ["X", "Y"])
    with pytest.raises(ValueError, match="no score"):
        normalised_scores({"a": {"C51": 1.0}}, ["C51", "X"])
    with pytest.raises(ValueError, match="worst"):
        normalised_scores({"a": {"C51": 0.0, "X": 1.0}}, ["C51", "X"])


def _config(
    *, lambdas: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0), mode: str = "fixed", action_conditioned: bool | None = None
) -> dict[str, Any]:
    model: dict[str, Any] = {f"lambda_{t}": v for t, v in zip(("ll", "lg", "gl", "gg"), lambdas, strict=True)}
    if action_conditioned is not None:
        model["action_conditioned"] = action_conditioned
    return {
        "seed_everything": 0,
        "model": model,
        "data": {"env": {"game": "bigfish"}, "horizon": {"mode": mode, "k": 2}},
    }


def test_classify() -> None:
    assert classify(_config(lambdas=(0.0, 0.0, 0.0, 0.0))) == "C51"
    assert classify(_config(lambdas=(0.0, 0.0, 0.0, 0.0), action_conditioned=False)) == "C51"
    assert classify(_config(action_conditioned=False)) == "DRIML-noact"
    assert classify(_config(mode="fixed")) == "DRIML-fix"
    assert classify(_config(mode="fixed", action_conditioned=True)) == "DRIML-fix"
    assert classify(_config(lambdas=(0.5, 0.0, 0.0, 0.0), mode="random")) == "DRIML-randk"
    assert classify(_config(mode="adaptive")) == "DRIML-ada"
    with pytest.raises(ValueError, match="horizon.mode"):
        classify(_config(mode="sometimes"))
    with pytest.raises(ValueError, match="lambda"):
        classify({"model": {"lambda_gg": 1.0}})


def test_reached_budget_allows_one_logging_interval() -> None:
    steps = np.array([100.0, 200.0, 300.0, 400.0])
    run = Run(Path("r"), "bigfish", "C51", 0, 500, steps, np.zeros(4))
    assert run.reached_budget
    run.total_env_steps = 600
    assert not run.reached_budget


COLUMNS = ["epoch", "eval/episode_return", "rollout/env_steps", "rollout/episode_return", "step", "train/loss"]
METHOD_CONFIG = {
    "C51": {"lambdas": (0.0, 0.0, 0.0, 0.0)},
    "DRIML-noact": {"mode": "random", "action_conditioned": False},
    "DRIML-fix": {"mode": "fixed"},
}


def _curve(final: float, last: int, start: int = 100, every: int = 100) -> list[tuple[int, float]]:
    """Rows every `every` env steps up to `last`; the rows in the last 10% average to `final`, earlier rows return 0."""
    steps = list(range(start, last + 1, every))
    window = [s for s in steps if s >= 0.9 * last]
    offsets = np.linspace(-1.0, 1.0, len(window)) if len(window) > 1 else [0.0]
    late = dict(zip(window, offsets, strict=True))
    return [(s, final + late[s] if s in late else 0.0) for s in steps]


def _write_run(root: Path, game: str, method: str, seed: int, versions: list[list[tuple[int, float]]]) -> None:
    config = _config(**METHOD_CONFIG[method])  # type: ignore[arg-type]
    config["seed_everything"] = seed
    config["data"]["env"]["game"] = game
    config["data"]["total_env_steps"] = 1000
    for v, rows in enumerate(versions):
        version = root / "logs" / f"version_{v}"
        version.mkdir(parents=True)
        (version / "config.yaml").write_text(yaml.safe_dump(config))
        with (version / "metrics.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerow([0, "", 50, "", 1, 0.5])  # before any episode finished: no return yet
            for i, (steps, ret) in enumerate(rows):
                writer.writerow([0, "", steps, ret, 10 * i, 0.1])
                writer.writerow([0, "", "", "", 10 * i + 5, 0.2])  # a train-only row
            writer.writerow([0, 99.0, "", "", 10 * len(rows), ""])  # an eval row is not a train-time return


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    finals = {
        ("coinrun", "C51"): [10.0, 12.0, 8.0],  # 10.00 ± 1.63
        ("coinrun", "DRIML-noact"): [4.0, 5.0, 6.0],  # 5.00 ± 0.82
        ("coinrun", "DRIML-fix"): [7.0, 9.0],  # 8.00 ± 1.00, one seed short of the others
        ("jumper", "C51"): [3.0, 3.0, 6.0],  # 4.00 ± 1.41
        ("jumper", "DRIML-fix"): [2.0, 4.0, 6.0],  # 4.00 ± 1.63; seed 2 stops at 500 of 1000 env steps
    }  # no DRIML-noact on jumper
    for (game, method), scores in finals.items():
        for seed, final in enumerate(scores):
            run = root / f"{game}-{method}-s{seed}"
            if (game, method, seed) == ("coinrun", "C51", 1):  # resumed at 500: version_0's rows 500, 600 redone
                first = [(s, 100.0) for s in range(100, 700, 100)]
                _write_run(run, game, method, seed, [first, _curve(final, 1000, start=500)])
            elif (game, method, seed) == ("jumper", "DRIML-fix", 2):
                _write_run(run, game, method, seed, [_curve(final, 500)])
            else:
                _write_run(run, game, method, seed, [_curve(final, 1000)])
    return root


def test_load_resumed_run(runs_root: Path) -> None:
    run = load_run(runs_root / "coinrun-C51-s1")
    assert (run.game, run.method, run.seed, run.total_env_steps) == ("coinrun", "C51", 1, 1000)
    np.testing.assert_array_equal(run.env_steps, np.arange(100, 1001, 100))
    np.testing.assert_array_equal(run.returns[:4], [100.0] * 4)
    assert run.superseded == 2
    assert run.final_score == pytest.approx(12.0)
    assert run.max_env_steps == 1000 and run.reached_budget


def test_report_end_to_end(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main([str(runs_root), "--out", str(out), "--reps", "200"]) == 0
    printed = capsys.readouterr().out.split()
    pngs = ["curves_coinrun.png", "curves_jumper.png", "intervals_minmax.png", "profiles_minmax.png",
            "sample_efficiency_minmax.png", "improvement.png"]  # fmt: skip
    # no random-policy return is known for these runs' level sets: no fixed-reference normalisation, no PNGs for it
    assert printed == [str(out / name) for name in ("report.md", "intervals.json", *pngs)]
    text = (out / "report.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "| Env | C51 | DRIML-noact | DRIML-fix |" in lines
    assert (
        "| coinrun | 10.00±1.63 (3 seeds) / 29.70±5.44 | 5.00±0.82 (3 seeds) / 13.15±1.21 "
        "| 8.00±1.00 (2 seeds) / 27.24±1.92 |"
    ) in lines
    # jumper / DRIML-fix seed 2 stopped at 500 of 1,000 env steps: its 6.0 is left out of (2, 4, 6)
    assert (
        "| jumper | 4.00±1.41 (3 seeds) / 13.22±0.83 | — / 4.31±0.64 "
        "| 3.00±1.00 (2 seeds; 1 unfinished left out) / 12.64±0.64 |"
    ) in lines
    # only coinrun has all three methods: ours (10, 5, 8) -> (1, 0, 0.6); paper (29.7, 13.15, 27.24) -> (1, 0, 0.85)
    assert "| **Norm. score** | 1.00 / 1.00 | 0.00 / 0.00 | 0.60 / 0.85 |" in lines
    missing = text.split("## Missing data")[1].split("## Runs")[0]
    assert "- Norm. score uses only the 1 games with a number for every method: ['coinrun']" in missing
    assert "- jumper: no runs for DRIML-noact" in missing
    assert "- coinrun / DRIML-fix: 2 seeds (max 3)" in missing
    assert "- jumper / DRIML-fix: 2 seeds (max 3)" in missing
    short = runs_root / "jumper-DRIML-fix-s2"
    assert f"- {short} (jumper, DRIML-fix, seed 2): reached 500 of 1,000 env steps (50%); left out" in missing
    resumed = runs_root / "coinrun-C51-s1"
    assert f"- {resumed} (coinrun, C51, seed 1): 2 rows logged before a resume were redone after it" in missing
    assert len([line for line in missing.splitlines() if line.startswith("- ")]) == 6
    assert f"| {short} | jumper | DRIML-fix | 2 | 6.000 | 500 / 1,000 |" in lines
    for game in ("coinrun", "jumper"):
        png = out / f"curves_{game}.png"
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_run_dir_and_errors(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "single"
    assert main([str(runs_root / "jumper-C51-s0"), "--out", str(out), "--reps", "200"]) == 0
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "| jumper | 3.00±0.00 (1 seed) / 13.22±0.83 |" in text
    assert "Norm. score (ours) not computed" in text  # a single method ties with itself on every game
    assert main([str(tmp_path / "nothing-here"), "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------------ interval estimates
def _study(root: Path, finals: dict[tuple[str, str], list[float]]) -> Path:
    for (game, method), scores in finals.items():
        for seed, final in enumerate(scores):
            _write_run(root / f"{game}-{method}-s{seed}", game, method, seed, [_curve(final, 1000)])
    return root


def _report(root: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert main([str(root), "--out", str(out), "--reps", "300", *extra]) == 0
    return json.loads((out / "intervals.json").read_text())


def _hand_iqm(values: np.ndarray) -> float:
    """The interquartile mean by hand: sort, drop the lowest and highest quarter, average the middle half."""
    x = np.sort(np.ravel(values))
    cut = len(x) // 4
    assert cut * 4 == len(x)  # only sizes where the quarter is a whole number of values
    return float(x[cut : len(x) - cut].mean())


def test_improvement_known_answers(tmp_path: Path) -> None:
    c51 = {"coinrun": [10.0, 12.0, 8.0, 11.0], "jumper": [3.0, 3.5, 6.0, 4.0]}
    finals: dict[tuple[str, str], list[float]] = {}
    for game, scores in c51.items():
        finals[game, "C51"] = scores
        finals[game, "DRIML-fix"] = [s + 20.0 for s in scores]  # beats every C51 run on every game
        finals[game, "DRIML-noact"] = list(scores)  # an identical copy
    blob = _report(_study(tmp_path / "runs", finals), tmp_path / "out")
    better = blob["minmax"]["improvement_over_C51"]["DRIML-fix"]
    assert better["point"] == 1.0 and better["ci"] == [1.0, 1.0]  # every resample keeps every pair ordered
    same = blob["minmax"]["improvement_over_C51"]["DRIML-noact"]
    assert same["point"] == 0.5
    assert same["ci"][0] < 0.5 < same["ci"][1]
    for game in c51:  # and per game, on raw returns
        assert blob["per_game"][game]["DRIML-fix"]["improvement_over_C51"]["point"] == 1.0
        assert blob["per_game"][game]["DRIML-noact"]["improvement_over_C51"]["point"] == 0.5
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| DRIML-fix | 1.00 [1.00, 1.00] |" in text
    assert (tmp_path / "out" / "improvement.png").read_bytes()[:4] == b"\x89PNG"


def test_iqm_mean_and_curves_against_hand_computations(tmp_path: Path) -> None:
    finals = {
        ("coinrun", "C51"): [1.0, 9.0, 3.0, 7.0, 5.0, 2.0, 8.0, 4.0],
        ("jumper", "C51"): [2.0, 0.0, 1.0, 12.0, 3.0, 5.0, 4.0, 6.0],
        ("coinrun", "DRIML-fix"): [6.0, 6.5, 7.0, 20.0, 5.5, 6.0, 7.5, 8.0],
        ("jumper", "DRIML-fix"): [4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5],
    }
    random = {"coinrun": 1.0, "jumper": 2.0}
    blob = _report(_study(tmp_path / "runs", finals), tmp_path / "out",
                   *[f"--random-return={g}={v}" for g, v in random.items()])  # fmt: skip
    fixed = blob["random"]
    assert fixed["games"] == ["coinrun", "jumper"] and fixed["runs"] == {"C51": 8, "DRIML-fix": 8}
    for method in ("C51", "DRIML-fix"):
        # fixed references: 0 = the given random return, 1 = the paper's C51 (29.7 on coinrun, 13.22 on jumper)
        norm = np.array([[(row[j] - random[g]) / (PAPER_TABLE[g]["C51"][0] - random[g]) for j, g in enumerate(random)]
                         for row in zip(*(finals[g, method] for g in random), strict=True)])  # fmt: skip
        iqm = fixed["aggregates"][method]["IQM"]
        assert iqm["point"] == pytest.approx(_hand_iqm(norm))
        assert iqm["point"] == pytest.approx(float(stats.trim_mean(norm, 0.25, axis=None)))
        assert iqm["ci"][0] <= iqm["point"] <= iqm["ci"][1] and iqm["ci"][0] < iqm["ci"][1]
        assert fixed["aggregates"][method]["mean"]["point"] == pytest.approx(norm.mean())
        assert fixed["aggregates"][method]["median"]["point"] == pytest.approx(np.median(norm.mean(axis=0)))
        gap = fixed["aggregates"][method]["optimality gap"]["point"]
        assert gap == pytest.approx(1.0 - np.minimum(norm, 1.0).mean())
        # performance profile: the fraction of the 16 runs x games above each tau
        for tau, frac in zip(fixed["profile_taus"], fixed["profiles"][method], strict=True):
            assert frac == pytest.approx(np.mean(norm > tau))
        # the sample-efficiency curve's last point (1,000 env steps) is each run's last logged return: final + 1
        steps = fixed["curve_env_steps"]
        assert steps[0] == 100 and steps[-1] == 1000 and len(steps) == 25
        assert fixed["curves"][method][-1] == pytest.approx(_hand_iqm(norm + np.array([1 / 28.7, 1 / 11.22])))
        assert fixed["curves"][method][0] == pytest.approx(_hand_iqm(-np.array([[1 / 28.7, 2 / 11.22]] * 8)))
    # the paper's min-max: per game 0 = the worse method's mean, 1 = the better's
    mm = blob["minmax"]
    lo = {g: min(np.mean(finals[g, m]) for m in ("C51", "DRIML-fix")) for g in random}
    hi = {g: max(np.mean(finals[g, m]) for m in ("C51", "DRIML-fix")) for g in random}
    fix = np.array([[(row[j] - lo[g]) / (hi[g] - lo[g]) for j, g in enumerate(random)]
                    for row in zip(*(finals[g, "DRIML-fix"] for g in random), strict=True)])  # fmt: skip
    assert mm["aggregates"]["DRIML-fix"]["mean"]["point"] == pytest.approx(1.0)
    assert mm["aggregates"]["C51"]["mean"]["point"] == pytest.approx(0.0, abs=1e-12)
    assert mm["aggregates"]["DRIML-fix"]["IQM"]["point"] == pytest.approx(_hand_iqm(fix))
    for name in ("intervals", "profiles", "sample_efficiency"):
        for norm_name in ("minmax", "random"):
            assert (tmp_path / "out" / f"{name}_{norm_name}.png").stat().st_size > 5000


def test_one_game_and_one_seed_say_so(tmp_path: Path) -> None:
    finals = {("jumper", "C51"): [3.0, 5.0, 4.0], ("jumper", "DRIML-fix"): [7.0]}
    blob = _report(_study(tmp_path / "runs", finals), tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "- One game (jumper): every aggregate below is that game's interval" in text
    assert blob["minmax"]["aggregates"]["DRIML-fix"]["IQM"] == {"point": 1.0, "ci": None}
    assert blob["minmax"]["aggregates"]["C51"]["IQM"]["ci"] is not None
    assert "| DRIML-fix | 1 x 1 | 1.00 (n=1: no interval) |" in text
    assert "| DRIML-fix | 1.00 (n=1: no interval) |" in text  # P(improvement) needs 2 runs of each
    per_game = blob["per_game"]["jumper"]
    assert per_game["C51"]["mean"]["point"] == pytest.approx(4.0) and per_game["C51"]["runs"] == 3
    low, high = per_game["C51"]["mean"]["ci"]
    assert 3.0 <= low < 4.0 < high <= 5.0  # a bootstrap of the mean of (3, 5, 4) stays inside [3, 5]
    assert "| jumper | C51 | 3 | 4.00 [" in text and "| jumper | DRIML-fix | 1 | 7.00 (n=1: no interval)" in text


def test_report_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _study(tmp_path / "runs", {("jumper", "C51"): [3.0, 4.0]})
    out = tmp_path / "out"
    for bad, needle in ((["--random-return", "jumpr=1"], "'jumpr' is not a Procgen game"),
                        (["--random-return", "jumper=low"], "'low' is not a number"),
                        (["--reps", "5"], "--reps 5 is not allowed"),
                        (["--up-to", "0"], "--up-to 0 is not allowed")):  # fmt: skip
        assert main([str(root), "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("driml_pl: error: ") and needle in err[0]
        assert not out.exists()


def test_up_to_scores_every_run_at_equal_env_steps(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cut"
    blob = _report(runs_root, out, "--up-to", "500")
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "**Scored on the logs up to 500 env steps** (`--up-to`)" in text
    # _curve: rows at 100..1000 return 0 before 900 env steps, so up to 500 every run scores 0 (the resumed coinrun
    # C51 seed 1 returns 100 on 100-400 and 0 at 500: its last 10% of 500 env steps is the row at 500)
    assert blob["per_game"]["jumper"]["C51"]["scores"] == [0.0, 0.0, 0.0]
    assert blob["per_game"]["coinrun"]["C51"]["scores"] == [0.0, 0.0, 0.0]
    assert f"| {runs_root / 'coinrun-C51-s0'} | coinrun | C51 | 0 | 0.000 | 500 / 1,000 |" in text
    # jumper / DRIML-fix seed 2 stopped at 500 of its 1,000: it reached the --up-to point, so it counts as finished
    assert blob["unfinished"]["runs"] == [] and blob["per_game"]["jumper"]["DRIML-fix"]["runs"] == 3
    assert "unfinished left out" not in text and "**Finished runs only**" not in text and "); left out" not in text


# ------------------------------------------------------------------------------------------ unfinished runs
SHORT_GRID = {
    ("coinrun", "C51"): [10.0, 12.0, 30.0],  # seed 2 stops at 140 of 1,000 env steps (14%)
    ("coinrun", "DRIML-fix"): [14.0, 16.0, 18.0],
    ("jumper", "C51"): [3.0, 5.0, 4.0],
    ("jumper", "DRIML-fix"): [7.0, 9.0, 8.0],
}


@pytest.fixture
def short_root(tmp_path: Path) -> Path:
    root = tmp_path / "grid"
    for (game, method), scores in SHORT_GRID.items():
        for seed, final in enumerate(scores):
            unfinished = (game, method, seed) == ("coinrun", "C51", 2)
            rows = _curve(final, 140, start=10, every=10) if unfinished else _curve(final, 1000)
            _write_run(root / f"{game}-{method}-s{seed}", game, method, seed, [rows])
    return root


def _expected(finals: dict[str, np.ndarray], reps: int = 300) -> dict[str, Any]:
    """``intervals.estimate_all`` on (runs, games) matrices of raw scores over (coinrun, jumper), min-max normalised
    as the report does (per game, 0 = the worse method's mean, 1 = the better's)."""
    games = ["coinrun", "jumper"]
    means = {g: [float(s[:, j].mean()) for s in finals.values()] for j, g in enumerate(games)}
    lo, hi = {g: min(v) for g, v in means.items()}, {g: max(v) for g, v in means.items()}
    normalised = {m: normalise(s, games, lo, hi) for m, s in finals.items()}
    return estimate_all(normalised, None, None, games, reps).to_json()


def _same_intervals(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("games", "runs", "aggregates", "improvement_over_C51", "profile_taus", "profiles", "profile_cis"):
        assert got[key] == want[key], key


def test_unfinished_runs_are_left_out_by_default(
    short_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    blob = _report(short_root, out)
    short = short_root / "coinrun-C51-s2"
    assert capsys.readouterr().err.splitlines() == [
        "driml_pl report: 1 unfinished run(s) left out of the table and the intervals (--include-unfinished "
        f"averages them in): {short} (coinrun, C51, seed 2) reached 140 of 1,000 env steps (14%)"
    ]
    text = (out / "report.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    # (10, 12) without the unfinished 30
    assert (
        "| coinrun | 11.00±1.00 (2 seeds; 1 unfinished left out) / 29.70±5.44 | 16.00±1.63 (3 seeds) / 27.24±1.92 |"
    ) in lines
    assert "| jumper | 4.00±0.82 (3 seeds) / 13.22±0.83 | 8.00±0.82 (3 seeds) / 12.64±0.64 |" in lines
    assert lines[2].startswith("**Finished runs only**: runs short of the budget are left out of the table, the "
                               "intervals and their figures (1 here, listed under Missing data)")  # fmt: skip
    assert f"- {short} (coinrun, C51, seed 2): reached 140 of 1,000 env steps (14%); left out" in lines
    assert blob["unfinished"] == {"included": False, "up_to": None, "runs": [
        {"path": str(short), "game": "coinrun", "method": "C51", "seed": 2, "env_steps": 140.0, "compared_at": 1000}
    ]}  # fmt: skip
    # the intervals: C51 keeps its two finished seeds on both games (the lowest seeds, equal per game)
    c51, fix = np.array([[10.0, 3.0], [12.0, 5.0]]), np.array([[14.0, 7.0], [16.0, 9.0], [18.0, 8.0]])
    _same_intervals(blob["minmax"], _expected({"C51": c51, "DRIML-fix": fix}))
    assert blob["minmax"]["runs"] == {"C51": 2, "DRIML-fix": 3}
    assert blob["minmax"]["improvement_over_C51"]["DRIML-fix"]["point"] == 1.0  # 30 would beat every DRIML-fix run
    assert "| C51 | 2 x 2 (1 unfinished left out) | " in text and "| DRIML-fix | 3 x 2 | " in text
    assert blob["minmax"]["curve_env_steps"][-1] == 1000  # the 14% run would end the curves at 140
    coinrun = blob["per_game"]["coinrun"]
    assert coinrun["C51"]["scores"] == [10.0, 12.0] and coinrun["C51"]["unfinished"] == 1
    assert coinrun["C51"]["mean"]["point"] == pytest.approx(11.0)
    assert coinrun["DRIML-fix"]["improvement_over_C51"]["point"] == 1.0
    assert "| coinrun | C51 | 2 (1 unfinished left out) | 11.00 [" in text


def test_include_unfinished_reproduces_the_averages_and_marks_them(
    short_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    blob = _report(short_root, out, "--include-unfinished")
    short = short_root / "coinrun-C51-s2"
    assert capsys.readouterr().err.splitlines() == [
        "driml_pl report: 1 unfinished run(s) averaged in (--include-unfinished): "
        f"{short} (coinrun, C51, seed 2) reached 140 of 1,000 env steps (14%)"
    ]
    text = (out / "report.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    # (10, 12, 30): mean 17.33, np.std 8.99
    cell = "| coinrun | 17.33±8.99 (3 seeds{}) / 29.70±5.44 | 16.00±1.63 (3 seeds) / 27.24±1.92 |"
    assert cell.format("; 1 unfinished included") in lines
    assert lines[2].startswith(
        "**Unfinished runs included** (`--include-unfinished`): runs short of the budget are "
        "averaged in, scored on the env steps they reached (1 here, listed under Missing data)"
    )
    progress = "reached 140 of 1,000 env steps (14%); averaged in (`--include-unfinished`)"
    assert f"- {short} (coinrun, C51, seed 2): {progress}" in lines
    assert blob["unfinished"]["included"] is True and [r["seed"] for r in blob["unfinished"]["runs"]] == [2]
    c51 = np.array([[10.0, 3.0], [12.0, 5.0], [30.0, 4.0]])
    _same_intervals(blob["minmax"], _expected({"C51": c51, "DRIML-fix": np.array([[14.0, 7.0], [16.0, 9.0],
                                                                                   [18.0, 8.0]])}))  # fmt: skip
    # coinrun: 6 of the 9 pairs beat C51 (all but those against the 30); jumper: all 9
    assert blob["minmax"]["improvement_over_C51"]["DRIML-fix"]["point"] == pytest.approx((6 / 9 + 1) / 2)
    assert blob["per_game"]["coinrun"]["DRIML-fix"]["improvement_over_C51"]["point"] == pytest.approx(6 / 9)
    assert "| C51 | 3 x 2 (1 unfinished included) | " in text
    assert "| coinrun | C51 | 3 (1 unfinished included) | 17.33 [" in text
    # the numbers are the ones the report gives when that run counts as finished (a budget of 140), unmarked
    config = short / "logs" / "version_0" / "config.yaml"
    edited = yaml.safe_load(config.read_text())
    edited["data"]["total_env_steps"] = 140
    config.write_text(yaml.safe_dump(edited))
    plain = _report(short_root, tmp_path / "plain")
    plain_text = (tmp_path / "plain" / "report.md").read_text(encoding="utf-8")
    assert cell.format("") in plain_text.splitlines() and "1 unfinished" not in plain_text
    assert plain["minmax"] == blob["minmax"] and plain["unfinished"]["runs"] == []
    for game, methods in plain["per_game"].items():
        for method, entry in methods.items():
            assert entry == {**blob["per_game"][game][method], "unfinished": 0}


def test_a_cell_of_unfinished_runs_only_says_so_and_up_to_can_finish_it(tmp_path: Path) -> None:
    root = tmp_path / "grid"
    for seed, final in enumerate([3.0, 5.0]):
        _write_run(root / f"C51-s{seed}", "jumper", "C51", seed, [_curve(final, 1000)])
    _write_run(root / "fix-s0", "jumper", "DRIML-fix", 0, [_curve(7.0, 140, start=10, every=10)])
    blob = _report(root, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert (
        "| jumper | 4.00±1.00 (2 seeds) / 13.22±0.83 | — (no finished seed; 1 unfinished left out) / 12.64±0.64 |"
    ) in text
    assert "- jumper: only unfinished runs for DRIML-fix, left out" in text
    assert "- DRIML-fix: only unfinished runs, left out of the intervals" in text
    assert list(blob["minmax"]["aggregates"]) == ["C51"] and list(blob["per_game"]["jumper"]) == ["C51"]
    # --up-to 500: the run is compared at 500 env steps, which it did not reach either
    _report(root, tmp_path / "at500", "--up-to", "500")
    text = (tmp_path / "at500" / "report.md").read_text(encoding="utf-8")
    progress = "reached 140 of 500 env steps (28% of --up-to); left out"
    assert f"- {root / 'fix-s0'} (jumper, DRIML-fix, seed 0): {progress}" in text
    assert "runs short of the budget or 500 env steps (whichever is lower) are left out" in text
    # --up-to 100: every run reached 100 env steps, so all count (rows before 900 env steps return 0)
    blob = _report(root, tmp_path / "at100", "--up-to", "100")
    text = (tmp_path / "at100" / "report.md").read_text(encoding="utf-8")
    assert "| jumper | 0.00±0.00 (2 seeds) / 13.22±0.83 | 0.00±0.00 (1 seed) / 12.64±0.64 |" in text
    assert blob["unfinished"]["runs"] == [] and "**Finished runs only**" not in text
