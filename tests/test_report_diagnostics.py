"""The report's horizons and probes (`driml_pl.tools.report_diagnostics`) on written metrics.csv files: the horizon
statistics by hand, resumed versions read once, and the figures and table written only where the runs logged them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_report import _config

from driml_pl.tools import report_diagnostics as diag
from driml_pl.tools.report import load_run, main

K_KEYS = [f"horizon/k_frac_{j}" for j in range(14)] + ["horizon/k_frac_over13"]


def _run(root: Path, mode: str, versions: list[list[dict[str, float]]], lambdas=(0.0, 0.0, 0.0, 1.0)) -> Path:
    """A run directory whose versions log ``versions``' rows (each a dict of columns; env steps under "x")."""
    config = _config(mode=mode, lambdas=lambdas)
    config["data"]["env"]["game"] = "fruitbot"
    config["data"]["total_env_steps"] = 1000
    columns = ["step", "rollout/env_steps", "rollout/episode_return", "probe/q_mean", "probe/grad_encoder_c51", *K_KEYS]
    for v, rows in enumerate(versions):
        version = root / "logs" / f"version_{v}"
        version.mkdir(parents=True)
        (version / "config.yaml").write_text(yaml.safe_dump(config))
        with (version / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            for i, row in enumerate(rows):
                writer.writerow({"step": i, "rollout/env_steps": row.pop("x"), **row})
                writer.writerow({"step": i, "probe/q_mean": 9.0})  # a row without env steps is not read
    return root


def _ada_rows(x: float, fracs: dict[int, float], ret: float = 1.0) -> dict[str, float]:
    row = {"x": x, "rollout/episode_return": ret, "probe/q_mean": x / 1000}
    row |= {K_KEYS[j]: fracs.get(j, 0.0) for j in range(15)}
    return row


def test_horizon_statistics_by_hand(tmp_path):
    # 9 rows: 100 .. 800 env steps, then 1000 alone in the last 10% with a different distribution
    early = {0: 0.2, 1: 0.4, 2: 0.2, 6: 0.2}  # anchors with k >= 1: 1 (0.5), 2 (0.25), 6 (0.25) -> mean k 2.5
    late = {1: 0.5, 3: 0.5}  # mean k 2
    rows = [_ada_rows(100.0 * i, early) for i in range(1, 9)] + [_ada_rows(1000.0, late)]
    run = load_run(_run(tmp_path / "ada", "adaptive", [rows]))
    h = diag.horizon_stats(run)
    f = (8 * np.array([0.2, 0.4, 0.2, 0, 0, 0, 0.2]) + np.array([0, 0.5, 0, 0.5, 0, 0, 0])) / 9  # the run's mean
    positive = f[1:].sum()
    assert h["run_mean_k"] == pytest.approx((f[1:] * np.arange(1, 7)).sum() / positive)
    assert h["run_k1"] == pytest.approx(f[1] / positive)
    assert h["run_k2plus"] == pytest.approx(f[2:].sum() / positive)
    assert h["run_k5plus"] == pytest.approx(f[6] / positive)
    assert (h["last10_mean_k"], h["last10_k1"], h["last10_k5plus"]) == pytest.approx((2.0, 0.5, 0.0))
    assert h["max_k"] == 6


def test_a_resumed_runs_redone_rows_are_read_once(tmp_path):
    first = [{"x": 100.0 * i, "rollout/episode_return": 0.0, "probe/q_mean": 1.0} for i in range(1, 7)]
    second = [{"x": 100.0 * i, "rollout/episode_return": 0.0, "probe/q_mean": 2.0} for i in range(4, 11)]
    run = load_run(_run(tmp_path / "c51", "fixed", [first, second], lambdas=(0.0, 0.0, 0.0, 0.0)))
    x, y = diag.series(run, ["probe/q_mean"])["probe/q_mean"]
    assert x.tolist() == [100.0 * i for i in range(1, 11)]
    assert y.tolist() == [1.0] * 3 + [2.0] * 7


def test_smooth_is_a_centred_running_mean():
    y = np.array([0.0, 3.0, 6.0, 9.0, 12.0])
    assert diag.smooth(y, 3).tolist() == [1.5, 3.0, 6.0, 9.0, 10.5]


def test_the_report_draws_horizons_and_probes_only_where_logged(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        rows = [_ada_rows(100.0 * i, {1: 0.7, 2: 0.3}, ret=float(seed)) for i in range(1, 11)]
        _run(runs / f"ada-s{seed}", "adaptive", [rows])
    plain = [{"x": 100.0 * i, "rollout/episode_return": 0.5} for i in range(1, 11)]  # no probe, no horizons
    _run(runs / "c51-s0", "fixed", [plain], lambdas=(0.0, 0.0, 0.0, 0.0))
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out), "--reps", "200"]) == 0
    assert (out / "horizons_fruitbot.png").stat().st_size > 10_000
    assert (out / "probes_fruitbot.png").stat().st_size > 10_000
    text = (out / "report.md").read_text()
    assert "## DRIML-ada's horizons" in text
    section = text.split("## DRIML-ada's horizons")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith(f"| {runs / 'ada-s'}")]
    assert len(table) == 2 and all("| 1.30 / 1.30 | 0.70 | 0.30 | 0.000 | 2 |" in line for line in table)
    assert not any("c51-s0" in line for line in table)

    only_c51 = tmp_path / "only"
    assert main([str(runs / "c51-s0"), "--out", str(only_c51), "--reps", "200"]) == 0
    assert not (only_c51 / "horizons_fruitbot.png").exists() and not (only_c51 / "probes_fruitbot.png").exists()
    assert "DRIML-ada's horizons" not in (only_c51 / "report.md").read_text()


def test_the_probe_table_gives_each_halfs_median(tmp_path):
    rows = [{"x": 100.0 * i, "rollout/episode_return": 1.0, "probe/q_mean": 0.0, "probe/grad_encoder_c51": float(i)}
            for i in range(1, 11)]  # fmt: skip
    run = load_run(_run(tmp_path / "c51", "fixed", [rows], lambdas=(0.0, 0.0, 0.0, 0.0)))
    [line] = [x for x in diag.probe_table([run]) if x.startswith(f"| {run.path} ")]
    # halves of 1,000 env steps: 100-400 (median of 1-4: 2.5) and 500-1000 (median of 5-10: 7.5); nothing else logged
    assert line == f"| {run.path} | C51 | 0 | 1.000 | 2.50 / 7.50 | — | — | — | — |"
    assert diag.probe_table([load_run(_run(tmp_path / "plain", "fixed", [[{"x": 100.0}]]))]) == []
