"""Evaluation (issue 9): level ranges, determinism, capped episodes, no effect on training, videos, plots, the
progress bar and the checkpoint table, on real Procgen with tiny budgets."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_args
from PIL import Image

from driml_pl.cli import DRIML, DRIMLCLI, TRAINER_DEFAULTS, DRIMLDataModule, main
from driml_pl.data.evaluation import LevelSet, play_episodes
from driml_pl.envs import EnvConfig
from driml_pl.tools.plots import extract_series, plot_run, read_rows
from driml_pl.video import count_frames, write_gif

EVAL = {
    "--data.eval_every_env_steps": 128,
    "--data.eval_max_steps": 60,
    "--data.eval_test_levels": 10,
    "--data.eval_video_every": 2,
    "--data.eval_video_frames": 25,
}


def first_action(obs: torch.Tensor) -> torch.Tensor:
    """A fixed policy: always action 0 (no network needed)."""
    return torch.zeros(obs.shape[0], dtype=torch.int64)


def level_set(name: str, start: int, count: int, seed: int = 1, episodes: int = 4) -> LevelSet:
    env = EnvConfig(game="bigfish", num_envs=episodes, num_levels=count, start_level=start)
    return LevelSet(name, env, rand_seed=seed, rng_seed=seed + 1)


def test_episodes_start_on_the_requested_levels_and_are_deterministic():
    train = play_episodes(level_set("train_levels", 0, 20), first_action, 1, epsilon=0.5, max_steps=40)
    held = play_episodes(level_set("test_levels", 20, 10), first_action, 1, epsilon=0.5, max_steps=40)
    assert len(train.returns) == len(held.returns) == 4
    assert ((train.level_seeds >= 0) & (train.level_seeds < 20)).all()
    assert ((held.level_seeds >= 20) & (held.level_seeds < 30)).all()
    again = play_episodes(level_set("train_levels", 0, 20), first_action, 1, epsilon=0.5, max_steps=40)
    np.testing.assert_array_equal(train.returns, again.returns)
    np.testing.assert_array_equal(train.lengths, again.lengths)
    np.testing.assert_array_equal(train.level_seeds, again.level_seeds)


def test_capped_episodes_count_their_return_up_to_the_cap():
    res = play_episodes(level_set("train_levels", 0, 20), first_action, 2, epsilon=1.0, max_steps=5, record_frames=3)
    assert res.capped.all() and (res.lengths == 5).all() and len(res.returns) == 4
    assert res.frames is not None and res.frames.shape == (3, 64, 64, 3) and res.frames.dtype == np.uint8


def test_gif_decodes_to_the_frame_count(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (17, 64, 64, 3), dtype=np.uint8)
    frames[3:8] = frames[2]  # a run of identical frames is stored once, with its summed duration
    path = write_gif(frames, tmp_path / "v.gif")
    assert count_frames(path) == 17
    with Image.open(path) as image:
        assert image.size == (128, 128)


def test_plot_series_and_png(tmp_path):
    logs = tmp_path / "logs" / "version_0"
    logs.mkdir(parents=True)
    keys = ["step", "rollout/env_steps", "rollout/episode_return", "train/c51_loss", "train/nce_gg", "eval/env_steps",
            "eval/train_levels_return", "eval/train_levels_return_std", "eval/test_levels_return"]  # fmt: skip
    rows = [
        {"step": "0", "rollout/env_steps": "100", "rollout/episode_return": "1", "train/c51_loss": "4",
         "train/nce_gg": "3"},
        {"step": "1", "rollout/env_steps": "200", "rollout/episode_return": "2", "train/c51_loss": "3",
         "train/nce_gg": "2"},
        {"step": "1", "eval/env_steps": "200", "eval/train_levels_return": "5", "eval/train_levels_return_std": "1",
         "eval/test_levels_return": "4"},
        {"step": "1", "train/c51_loss": "2.5"},  # no x of its own: takes step 1's env steps
    ]  # fmt: skip
    with open(logs / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    series = extract_series(read_rows(tmp_path))
    assert set(series) == {"rollout/episode_return", "train/c51_loss", "train/nce_gg", "eval/train_levels_return",
                           "eval/train_levels_return_std", "eval/test_levels_return"}  # fmt: skip
    np.testing.assert_array_equal(series["rollout/episode_return"][0], [100, 200])
    np.testing.assert_array_equal(series["train/c51_loss"][1], [4, 3, 2.5])
    np.testing.assert_array_equal(series["eval/test_levels_return"][0], [200])
    out = plot_run(tmp_path)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500


def read_csv(run: Path) -> list[dict[str, str]]:
    return read_rows(run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny fit twice: with evaluation (videos every 2nd period) and without."""
    root = tmp_path_factory.mktemp("eval")
    with_eval, without = root / "with", root / "without"
    cli = DRIMLCLI(DRIML, DRIMLDataModule, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0,
                   args=tiny_args(with_eval, budget=384, **EVAL), auto_configure_optimizers=False)  # fmt: skip
    main(tiny_args(without, budget=384))
    return cli, with_eval, without


@pytest.mark.slow
def test_evaluation_does_not_change_training(runs):
    _, with_eval, without = runs
    a = torch.load(with_eval / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(without / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 40
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    states_a, states_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for sa, sb in zip(states_a.values(), states_b.values(), strict=True):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=0)


@pytest.mark.slow
def test_periodic_and_final_evaluation_logs_both_level_sets(runs):
    _, with_eval, without = runs
    rows = [r for r in read_csv(with_eval) if r.get("eval/env_steps")]
    # epoch ends at 160 (crosses 128), 256 (crosses 256), 352 (crosses 384? no), the budget's end at 384
    assert [float(r["eval/env_steps"]) for r in rows] == [160, 256, 384]
    for row in rows:
        for name in ("train_levels", "test_levels"):
            assert float(row[f"eval/{name}_episodes"]) == 2
            assert math.isfinite(float(row[f"eval/{name}_return"]))
            assert float(row[f"eval/{name}_return_std"]) >= 0
            assert 0 <= float(row[f"eval/{name}_capped"]) <= 2
    assert not any(r.get("eval/env_steps") for r in read_csv(without))


@pytest.mark.slow
def test_videos_plot_and_progress_bar(runs):
    cli, with_eval, _ = runs
    videos = sorted((with_eval / "videos").glob("*.mp4"))
    # videos every 2nd period of 128 env steps (at 256) and at the budget's end, for both level sets
    names = [p.name.split("_return")[0] for p in videos]
    assert names == [f"eval_{s}_step{n:010d}" for s in ("test_levels", "train_levels") for n in (256, 384)]
    assert all(1 <= count_frames(p) <= 25 for p in videos)
    with Image.open(with_eval / "plot.png") as image:
        assert image.format == "PNG"
    bar = cli.trainer.progress_bar_callback
    assert bar is not None and bar.total == 384 and bar.env_steps == 384
    assert bar.lines and bar.lines[-1].startswith("driml_pl: 384/384 env steps (100.0%)")


@pytest.mark.slow
def test_validate_prints_a_table_and_batch_jobs_can_turn_the_bar_off(runs, capsys, tmp_path):
    _, with_eval, _ = runs
    ckpt = str(with_eval / "checkpoints" / "last.ckpt")
    extra = {**EVAL, "--ckpt_path": ckpt, "--trainer.default_root_dir": str(tmp_path / "val")}
    main(["validate", *tiny_args(with_eval, budget=384, **extra)[1:]])
    out = capsys.readouterr().out
    assert "training levels" in out and "held-out levels" in out and "0-19" in out and "20-29" in out
    assert "1.12 +- 1.03" in out  # the paper's bigfish DRIML-randk number
    assert len(list((tmp_path / "val" / "videos").glob("eval_*_update*.mp4"))) == 2
    main(tiny_args(tmp_path / "quiet", budget=128, **{"--trainer.enable_progress_bar": "false"}))
    assert (tmp_path / "quiet" / "checkpoints" / "last.ckpt").is_file()
