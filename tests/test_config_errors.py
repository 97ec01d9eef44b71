"""Every bad config value is refused before anything is written: exit 2, one line naming the key and the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, config_args

from driml_pl.cli import DRIMLCLI, TRAINER_DEFAULTS, main
from driml_pl.data import DRIMLDataModule
from driml_pl.learner import DRIML

QUICKSTART = str(CONF / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Run from an empty directory (so 'nothing written' is checkable) with a bare sys.argv (as `python -m`)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["driml_pl"])


def _args(run: Path, *override: str, config: str = QUICKSTART) -> list[str]:
    return ["fit", "--config", config, "--trainer.default_root_dir", str(run), *override]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("driml_pl: error: "), stderr
    return lines[0]


# (overrides, the text the one line must hold: key=value and what is allowed)
CASES = {
    "unknown_key": (
        ["--model.lambda_xx", "1"],
        "model.lambda_xx=1 is not allowed: unknown key; valid keys under model: ",
    ),
    "misspelt_key": (["--data.env.gam", "coinrun"], "data.env.gam=coinrun is not allowed: unknown key"),
    "unknown_game": (
        ["--data.env.game", "pacman"],
        "data.env.game=pacman is not allowed: unknown game 'pacman'; valid games: bigfish, bossfight",
    ),
    "negative_lambda_gg": (["--model.lambda_gg", "-1"], "model.lambda_gg=-1.0 is not allowed: a number >= 0"),
    "negative_lambda_ll": (["--model.lambda_ll", "-0.5"], "model.lambda_ll=-0.5 is not allowed: a number >= 0"),
    "continuation_map": (
        ["--model.continuation_map", "tanh"],
        "model.continuation_map=tanh is not allowed: unknown continuation_map 'tanh'; valid: softmax, sigmoid",
    ),
    "horizon_k_0": (["--data.horizon.k", "0"], "data.horizon.k=0 is not allowed: an integer >= 1"),
    "n_step_0": (["--data.n_step", "0"], "data.n_step=0 is not allowed: an integer >= 1"),
    "n_step_beyond_replay": (
        ["--data.replay_size", "1600", "--data.n_step", "99"],
        "data.n_step=99 is not allowed: the replay holds 100 steps per env",
    ),
    "k_beyond_replay": (
        ["--data.replay_size", "1600", "--data.horizon.k", "100"],
        "data.horizon.k=100 is not allowed: the replay holds 100 steps per env",
    ),
    "replay_below_window": (
        ["--data.replay_size", "32", "--data.batch_size", "32"],
        "data.replay_size=32 is not allowed: the replay holds 2 steps per env",
    ),
    "batch_size_0": (["--data.batch_size", "0"], "data.batch_size=0 is not allowed: an integer > 0"),
    "replay_size_negative": (["--data.replay_size", "-5"], "data.replay_size=-5 is not allowed: an integer > 0"),
    "num_envs_0": (["--data.env.num_envs", "0"], "data.env.num_envs=0 is not allowed: an integer > 0"),
    "total_env_steps_0": (["--data.total_env_steps", "0"], "data.total_env_steps=0 is not allowed: an integer > 0"),
    "total_env_steps_not_a_multiple": (
        ["--data.total_env_steps", "100001"],
        "total_env_steps=100001 is not a multiple",
    ),
    "horizon_mode_unknown": (
        ["--data.horizon.mode", "sometimes"],
        "unknown horizon.mode 'sometimes'; valid: fixed, random",
    ),
    "updates_per_epoch_0": (["--data.updates_per_epoch", "0"], "data.updates_per_epoch=0 is not allowed"),
    "replay_ratio_0": (["--data.replay_ratio", "0"], "data.replay_ratio=0.0 is not allowed: a number > 0"),
    "eval_episodes_0": (["--data.eval_episodes", "0"], "data.eval_episodes=0 is not allowed: an integer > 0"),
    "num_atoms_1": (["--model.num_atoms", "1"], "model.num_atoms=1 is not allowed: an integer >= 2"),
    "target_update_0": (["--model.target_update_interval", "0"], "model.target_update_interval=0 is not allowed"),
    "lr_0": (["--model.lr", "0"], "model.lr=0.0 is not allowed: a number > 0"),
    "learning_starts_at_budget": (
        ["--data.learning_starts", "192000"],
        "data.learning_starts=192000 is not allowed: an integer >= 0 and below data.total_env_steps=192000",
    ),
    "learning_starts_negative": (["--data.learning_starts", "-1"], "data.learning_starts=-1 is not allowed"),
    "batch_beyond_replay": (
        ["--data.batch_size", "200000"],
        "data.batch_size=200000 is not allowed: at most data.replay_size=100000",
    ),
    "precision_bf16_true": (
        ["--trainer.precision", "bf16-true"],
        "trainer.precision=bf16-true is not allowed: one of 32-true, 32, bf16-mixed",
    ),
    "precision_16_true": (["--trainer.precision", "16-true"], "trainer.precision=16-true is not allowed"),
    "precision_64_true": (["--trainer.precision", "64-true"], "trainer.precision=64-true is not allowed"),
    "wrong_type": (["--data.n_step", "three"], "data.n_step=three is not allowed: a value of type int"),
    "cuda_graphs_with_inductor_graphs": (
        ["--model.cuda_graphs", "true", "--model.compile_mode", "reduce-overhead"],
        "model.compile_mode=reduce-overhead is not allowed: with model.cuda_graphs=true one of auto, default, "
        "max-autotune-no-cudagraphs",
    ),
    "cuda_graphs_with_a_gradient_scaler": (
        ["--model.cuda_graphs", "true", "--trainer.precision", "16-mixed"],
        "trainer.precision=16-mixed is not allowed: with model.cuda_graphs=true one of 32-true, 32, bf16-mixed",
    ),
}


@pytest.mark.parametrize(("override", "message"), list(CASES.values()), ids=list(CASES))
def test_bad_value_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_:
        main(_args(tmp_path / "run", *override))
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert message in _one_line(captured.err)
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing else either


def test_unknown_key_in_a_config_file_names_the_key_and_its_value(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lambda_gg: 1.0\n  lambda_xy: 0.5\n")
    with pytest.raises(SystemExit) as exit_:
        main([*_args(tmp_path / "run"), "--config", str(bad)])
    assert exit_.value.code == 2
    assert "model.lambda_xy=0.5 is not allowed: unknown key" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_good_values_at_the_edges_are_accepted(tmp_path, capsys):
    """The checks refuse only what cannot run: these all parse (--print_config exits 0 and writes nothing)."""
    edges = {"replay_size": 1600, "n_step": 98, "horizon.k": 98, "learning_starts": 0, "batch_size": 1600}
    flags = [x for key, value in edges.items() for x in (f"--data.{key}", str(value))]
    flags += ["--model.lambda_gg", "0", "--trainer.precision", "bf16-mixed"]
    with pytest.raises(SystemExit) as exit_:
        main([*_args(tmp_path / "run", *flags), "--print_config"])
    assert exit_.value.code == 0
    assert "n_step: 98" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "config", "message"),
    [
        (["--data.env.gam", "coinrun"], QUICKSTART, "data.env.gam=coinrun is not allowed: unknown key"),
        ([], "missing.yaml", "missing.yaml is not allowed: no such file; give the path of a YAML config"),
        (["--trainer.precision", "bf16-true"], QUICKSTART, "trainer.precision=bf16-true is not allowed"),
    ],
    ids=["unknown_key", "missing_config", "precision"],
)
def test_cli_process_exits_2_with_one_line_and_no_run_directory(tmp_path, override, config, message):
    """As a user sees it: a real process, exit code 2, one line on stderr, nothing on stdout, no run directory."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "driml_pl", *_args(run, *override, config=config)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # as a user runs it: warnings not hidden
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert message in _one_line(proc.stderr)
    assert proc.stdout == ""
    assert not run.exists() and list(tmp_path.iterdir()) == []


class _Checked(Exception):
    pass


class _CheckOnly(DRIMLCLI):
    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        raise _Checked


@pytest.mark.parametrize("config", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_shipped_config_passes_the_checks(tmp_path, config):
    with pytest.raises(_Checked):
        args = ["fit", *config_args(config)]
        _CheckOnly(DRIML, DRIMLDataModule, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0, args=args)
    assert list(tmp_path.iterdir()) == []
