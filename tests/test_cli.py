"""End to end through the CLI on real Procgen: budget, metrics, checkpoints, resume, configs, bad input."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, ROOT, config_args, paper, tiny_args

from driml_pl.cli import main

pytestmark = pytest.mark.slow


def read_metrics(run: Path) -> list[dict[str, str]]:
    rows = []
    for version in sorted((run / "logs").glob("version_*")):
        with open(version / "metrics.csv") as f:
            rows += list(csv.DictReader(f))
    return rows


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


def expected_updates(budget: int, learning_starts: int = 64, ratio: float = 2.0, batch: int = 16) -> int:
    return math.floor((budget - learning_starts) * ratio / batch)


def test_fit_honours_budget_logs_finite_losses_and_writes_checkpoint(run_dir):
    main(tiny_args(run_dir, budget=512))
    rows = read_metrics(run_dir)
    assert last_value(rows, "rollout/env_steps") == 512
    for key in ("train/c51_loss", "train/nce_gg", "train/q_mean", "train/loss"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(math.isfinite(v) for v in values), key
    assert {"rollout/epsilon", "perf/env_steps_per_s", "perf/updates_per_s", "rollout/episode_return"} <= set(rows[0])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == expected_updates(512) == 56
    assert ckpt["driml_unit"]["updates"] == 56
    unit = ckpt["driml_unit"]["unit"]  # the checkpoint unit: per-rank state and replay segments
    assert (run_dir / "checkpoints" / "units" / unit / "rank0" / "state.json").is_file()
    assert any((run_dir / "checkpoints" / "replay" / "rank0").iterdir())
    config = yaml.safe_load((run_dir / "logs" / "version_0" / "config.yaml").read_text())
    assert config["data"]["total_env_steps"] == 512 and config["data"]["frame_stack"] == 1


@pytest.mark.parametrize("mode", ["random", pytest.param("adaptive", marks=pytest.mark.full)])
def test_resume_continues_counters_and_equals_an_uninterrupted_run(tmp_path, mode):
    whole, split = tmp_path / "whole", tmp_path / "split"
    horizon = {"--data.horizon.mode": mode, "--data.horizon.k": 2 if mode == "random" else 5}
    if mode == "random":  # with periodic evaluation (issue 9): resume stays exact
        horizon |= {"--data.eval_every_env_steps": 128, "--data.eval_max_steps": 30}
    main(tiny_args(whole, budget=512, **horizon))
    main(tiny_args(split, budget=512, **horizon, **{"--trainer.max_epochs": 2}))  # stops after 24 updates
    first = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 24
    main(tiny_args(split, budget=512, **horizon, **{"--ckpt_path": "last"}))
    a = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 56
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    states_a, states_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert len(states_a) == len(states_b) > 0
    for sa, sb in zip(states_a.values(), states_b.values(), strict=True):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=0)
    rows = read_metrics(split)
    assert last_value(rows, "rollout/env_steps") == 512
    assert len(list((split / "logs").glob("version_*"))) == 2  # the resume logged to a new version, nothing lost


def test_fresh_run_refuses_to_overwrite_checkpoints(run_dir):
    main(tiny_args(run_dir, budget=128))
    stamp = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    with pytest.raises(SystemExit) as err:
        main(tiny_args(run_dir, budget=128))
    assert err.value.code == 2
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.env.game", "pacman"], "unknown game 'pacman'"),
        pytest.param(
            ["--data.total_env_steps", "1001"], "total_env_steps=1001 is not a multiple", marks=pytest.mark.full
        ),
        pytest.param(
            ["--data.horizon.mode", "sometimes"],
            "unknown horizon.mode 'sometimes'; valid: fixed, random",
            marks=pytest.mark.full,
        ),
    ],  # a subprocess each (the exit code as the shell sees it); test_config_errors.py has these in-process too
)
def test_bad_input_gives_one_line_error_nonzero_exit_and_no_output(tmp_path, override, message):
    run = tmp_path / "bad"
    cmd = [sys.executable, "-m", "driml_pl", *tiny_args(run), *override]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("driml_pl: error:") and message in last
    assert not run.exists()


@pytest.mark.parametrize("config", sorted(CONF.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # in-process (a subprocess per config cost ~5 s of imports each)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *config_args(config), "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-2000:]
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["env"]["game"] in {"bigfish", "fruitbot"}
    assert resolved["data"]["total_env_steps"] % resolved["data"]["env"]["num_envs"] == 0
    assert resolved["model"]["num_atoms"] == 51


def test_bigfish_config_is_the_paper_setting():
    cfg = yaml.safe_load((CONF / "bigfish.yaml").read_text())
    m, d = cfg["model"], cfg["data"]
    assert (m["lambda_gg"], m["lambda_ll"], m["lambda_lg"], m["lambda_gl"]) == (1.0, 0.0, 0.0, 0.0)
    assert (m["lr"], m["adam_eps"], m["max_grad_norm"], m["target_update_interval"]) == (2.5e-4, 0.01 / 256, 10, 312)
    assert (d["batch_size"], d["replay_ratio"], d["n_step"], d["gamma"], d["learning_starts"]) == (
        256,
        8,
        7,
        0.99,
        1000,
    )
    assert d["env"] == {"game": "bigfish", "num_envs": 32, "num_levels": 500, "start_level": 0,
                        "distribution_mode": "easy", "use_sequential_levels": True, "paint_vel_info": True}  # fmt: skip
    assert d["total_env_steps"] == 50_000_000 and d["horizon"] == {"mode": "random", "k": 2}
    c51 = yaml.safe_load((CONF / "c51_bigfish.yaml").read_text())
    assert all(c51["model"][f"lambda_{t}"] == 0.0 for t in ("ll", "lg", "gl", "gg"))
    assert c51["data"] == d | {"horizon": d["horizon"]}


EXPECTED_VARIANT = {
    "c51": "C51",
    "noact": "DRIML-noact",
    "randk": "DRIML-randk",
    "fix": "DRIML-fix",
    "ada": "DRIML-ada",
}


# The default session runs DRIML-ada, the variant with most code of its own (the pair model, its horizon); c51,
# randk, fix and noact are the quickstart's, the horizon tests' and the critic tests' paths: `nox -s tests_full`.
VARIANTS = [v if v == "ada" else pytest.param(v, marks=pytest.mark.full) for v in sorted(EXPECTED_VARIANT)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_paper_variant_runs_end_to_end_and_is_classified(tmp_path, variant):
    from driml_pl.tools.report import classify

    root = tmp_path / "{game}" / "seed{seed}"
    seed = 2 if variant == "ada" else 0  # DRIML-ada's A and negative shuffles follow the run's seed
    overrides = {"--data.env.game": "coinrun", "--seed_everything": seed}
    main(tiny_args(root, budget=256, config=paper(variant), **overrides))
    run = tmp_path / "coinrun" / f"seed{seed}"  # the templated run directory
    rows = read_metrics(run)
    assert last_value(rows, "rollout/env_steps") == 256
    assert math.isfinite(last_value(rows, "train/c51_loss"))
    config = yaml.safe_load((run / "logs" / "version_0" / "config.yaml").read_text())
    assert classify(config) == EXPECTED_VARIANT[variant]
    nce = [k for k in rows[0] if k.startswith("train/nce_")]
    assert nce == ([] if variant == "c51" else ["train/nce_gg"])
    if variant == "ada":
        k_mean = last_value(rows, "horizon/k_mean")
        cont = last_value(rows, "horizon/continuation_mean")
        assert 1.0 <= k_mean <= 13 and 0.05 <= cont <= 0.95
        assert math.isfinite(last_value(rows, "train/pair_loss"))
        hparams = yaml.safe_load((run / "logs" / "version_0" / "hparams.yaml").read_text())
        assert hparams["seed"] == 2 and hparams["continuation_map"] == config["model"]["continuation_map"]


def test_validate_and_test_play_episodes_from_a_checkpoint(run_dir):
    main(tiny_args(run_dir, budget=128))
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    for sub in ("validate", "test"):
        main([sub, *tiny_args(run_dir, budget=128, **{"--ckpt_path": ckpt})[1:]])
    rows = read_metrics(run_dir)
    for prefix in ("eval", "test"):  # both level sets, every episode counted (capped ones too)
        assert last_value(rows, f"{prefix}/train_levels_episodes") == last_value(rows, f"{prefix}/test_levels_episodes")
        assert last_value(rows, f"{prefix}/train_levels_episodes") == 2


def test_bf16_mixed_precision_with_every_term_gives_finite_losses(run_dir):
    terms = {"--model.lambda_ll": 1.0, "--model.lambda_lg": 0.5, "--model.lambda_gl": 0.5}
    main(tiny_args(run_dir, budget=256, **{"--trainer.precision": "bf16-mixed"}, **terms))
    rows = read_metrics(run_dir)
    for key in ("train/c51_loss", "train/nce_ll", "train/nce_lg", "train/nce_gl", "train/nce_gg"):
        assert math.isfinite(last_value(rows, key)), key
    assert last_value(rows, "rollout/env_steps") == 256


PAPER_DIFFERENCES = {  # what each method changes in conf/paper/protocol.yaml, besides its run directory
    "randk": {},
    "c51": {"model": {"lambda_gg": 0.0}},
    "fix": {"data": {"horizon": {"mode": "fixed", "k": 1}}},
    "noact": {"model": {"rkhs_dim": 128, "action_conditioned": False}},
    "ada": {"model": {"pair_hidden": 64, "horizon_decay": 0.9, "continuation_map": "sigmoid", "continuation_eps": 0.05},
            "data": {"horizon": {"mode": "adaptive", "k": 13}}},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(PAPER_DIFFERENCES))
def test_each_paper_method_file_states_only_its_difference_from_the_protocol(method):
    protocol = yaml.safe_load((CONF / "paper" / "protocol.yaml").read_text())
    own = yaml.safe_load((CONF / "paper" / f"{method}.yaml").read_text())
    assert own.pop("trainer") == {"default_root_dir": f"runs/paper/{method}/{{game}}/seed{{seed}}"}
    for section, values in own.items():  # a key the file repeats with the protocol's value is no difference
        own[section] = {k: v for k, v in values.items() if protocol[section].get(k) != v}
    assert {s: v for s, v in own.items() if v} == PAPER_DIFFERENCES[method]
    assert protocol["model"]["lambda_gg"] == 1.0 and protocol["data"]["horizon"] == {"mode": "random", "k": 2}
    bigfish = yaml.safe_load((CONF / "bigfish.yaml").read_text())  # the README's one self-contained file
    for section in ("model", "data", "checkpoint"):
        assert {k: v for k, v in bigfish[section].items() if k != "cuda_graphs"} == protocol[section], section
