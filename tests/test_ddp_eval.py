"""Evaluation under DDP, run (issue 18.3): a 2-rank gloo fit that evaluates during training, and a 2-rank `validate`.

Each rank plays its share of `data.eval_episodes` (`rank_share`: the first ranks take the rest, at least one each)
on its own seeds; the module gathers every rank's episodes before the mean. The test replays each rank's episodes
independently (`play_episodes` with that rank's level sets and the checkpoint's greedy policy) and checks the logged
counts, means and standard deviations against those episodes pooled. About 1 minute on the 2-core machine.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, tiny_args

from driml_pl.data import DRIMLDataModule
from driml_pl.data.evaluation import play_episodes, rank_share
from driml_pl.envs import EnvConfig
from driml_pl.learner import DRIML

pytestmark = [pytest.mark.slow, pytest.mark.full]  # DDP itself: test_ddp.py, in the default session
EVAL = {"--data.eval_episodes": 3, "--data.eval_every_env_steps": 256, "--data.eval_max_steps": 300,
        "--data.eval_test_levels": 10}  # fmt: skip
DDP = {"--trainer.accelerator": "cpu", "--trainer.devices": 2, "--trainer.strategy": "ddp",
       "--trainer.enable_progress_bar": "false"}  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "driml_pl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _eval_rows(run: Path, version: int) -> list[dict[str, float]]:
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if k.startswith("eval/") and v} for r in csv.DictReader(f)]
    return [r for r in rows if r]


def _replay(run: Path) -> dict[str, list]:
    """Each rank's evaluation episodes, played again here with the final weights: {level set: [rank0, rank1]}."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    model = DRIML(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    data = yaml.safe_load((run / "logs" / "version_0" / "config.yaml").read_text())["data"]
    dm = DRIMLDataModule(env=EnvConfig(**data["env"]), eval_episodes=3, eval_test_levels=10, seed=0,
                         frame_stack=data["frame_stack"])  # fmt: skip
    played: dict[str, list] = {"train_levels": [], "test_levels": []}
    for rank in (0, 1):
        dm._rank = lambda rank=rank: (rank, 2)  # type: ignore[method-assign]
        for level_set in dm._level_sets(seed_offset=1):  # validation's seeds
            with torch.inference_mode():
                played[level_set.name].append(play_episodes(level_set, model.act, dm.frame_stack, dm.eval_epsilon, 300))
    return played


def test_two_rank_fit_and_validate_gather_every_ranks_episodes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit = _cli(*tiny_args(run, budget=512, **DDP, **EVAL))
    during = _eval_rows(run, 0)
    assert [r["eval/env_steps"] for r in during] == [256, 512]  # every 256 global env steps, the last at the budget
    shown = _cli("validate", *tiny_args(run, budget=512, **DDP, **EVAL)[1:], "--ckpt_path", "last").stdout
    [after] = _eval_rows(run, 1)

    played = _replay(run)
    assert [rank_share(3, r, 2) for r in (0, 1)] == [2, 1]
    for name, (first, last) in (("train_levels", (0, 20)), ("test_levels", (20, 30))):
        ranks = played[name]
        assert [len(x.returns) for x in ranks] == [2, 1]  # the documented split of 3 episodes over 2 ranks
        seeds = np.concatenate([x.level_seeds for x in ranks])
        assert ((first <= seeds) & (seeds < last)).all(), seeds  # the documented level ranges
        pooled = np.concatenate([x.returns for x in ranks])
        lengths = np.concatenate([x.lengths for x in ranks])
        key = f"eval/{name}"
        for logged in (after, during[-1]):  # validate, and the fit's final evaluation (the same weights and seeds)
            assert logged[f"{key}_episodes"] == 3 and logged[f"{key}_capped"] == 0
            assert logged[f"{key}_return"] == pytest.approx(pooled.mean(), rel=1e-6, abs=1e-6)
            assert logged[f"{key}_return_std"] == pytest.approx(pooled.std(), rel=1e-6, abs=1e-6)
            assert logged[f"{key}_length"] == pytest.approx(lengths.mean(), rel=1e-6)
    # rank 1's episode counts: the pooled mean is not rank 0's alone
    assert any(played[n][1].lengths[0] != played[n][0].lengths.mean() for n in played)
    assert (
        "│ training levels │ 0-19        │        3 │" in shown
        and "│ held-out levels │ 20-29       │        3 │" in shown
    )
    assert "sync_dist=True" not in fit.stderr  # the gathered values are logged as global values, no warning
