"""``fit --ckpt_path``: a model setting given otherwise than the checkpoint's is refused in one line (Lightning would
drop it silently), and ``--fork true`` continues the checkpoint's state under it as a new run, leaving the source run
untouched; a term turned off by a fork adds exactly nothing to the encoder's gradient."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import yaml
from test_checkpoint import fit

from driml_pl.checkpoint.fork import fork_overrides, settings_changes

SAVED = {"lambda_gg": 1.0, "lambda_ll": 0.0, "feature_dim": 64, "obs_size": (64, 64), "critic_terms": None}


def test_settings_changes_compare_values_not_containers():
    given = {"lambda_gg": 1.0, "lambda_ll": 0.0, "feature_dim": 64, "obs_size": [64, 64], "probe": True}
    assert settings_changes(given, SAVED) == {}  # a tuple saved, a list parsed; probe is newer than the checkpoint
    assert settings_changes({**given, "lambda_gg": 0.0}, SAVED) == {"lambda_gg": (1.0, 0.0)}
    forked = {**SAVED, "lambda_gg": 0.0, "critic_terms": ["gg"]}
    assert settings_changes({**given, "lambda_gg": 0.0, "critic_terms": None}, forked) == {}  # a fork resumes as itself


def test_what_a_resume_and_a_fork_may_change(tmp_path):
    ckpt = tmp_path / "src" / "checkpoints" / "last.ckpt"
    new = tmp_path / "new"
    assert fork_overrides({}, SAVED, False, ckpt, new) == {}
    # how the run computes follows the config on any resume (a machine without a compiler, CUDA graphs on a GPU)
    assert fork_overrides({"cuda_graphs": (False, True)}, SAVED, False, ckpt, new) == {"cuda_graphs": True}
    assert fork_overrides({}, {**SAVED, "critic_terms": ["gg"]}, False, ckpt, new) == {"critic_terms": ["gg"]}
    with pytest.raises(ValueError, match=r"^model.lambda_gg=0.0 is not allowed with --ckpt_path .*add --fork true"):
        fork_overrides({"lambda_gg": (1.0, 0.0)}, SAVED, False, ckpt, new)
    assert fork_overrides({"lambda_gg": (1.0, 0.0)}, SAVED, True, ckpt, new) == {"lambda_gg": 0.0,
                                                                                  "critic_terms": ["gg"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"^model.feature_dim=128 is not allowed with --fork: .*model.lambda_gg"):
        fork_overrides({"feature_dim": (64, 128)}, SAVED, True, ckpt, new)
    with pytest.raises(
        ValueError, match=r"^model.lambda_ll=1.0 is not allowed with --fork: .*no critic heads for the ll"
    ):
        fork_overrides({"lambda_ll": (0.0, 1.0)}, SAVED, True, ckpt, new)
    with pytest.raises(ValueError, match=r"^--fork true is not allowed into .*src: it is the run of the checkpoint"):
        fork_overrides({"lambda_gg": (1.0, 0.0)}, SAVED, True, ckpt, tmp_path / "src")


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_a_fork_turns_infonce_off_from_a_checkpoint_and_leaves_the_source_run_as_it_was(straight, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for p in straight.rglob("*"):  # a copy, so the session's straight run stays read-only
        if p.is_file():
            (source / p.relative_to(straight)).parent.mkdir(parents=True, exist_ok=True)
            (source / p.relative_to(straight)).write_bytes(p.read_bytes())
    before = _digest(source)
    ckpt = str(source / "checkpoints" / "last.ckpt")
    longer = {"--data.total_env_steps": "1024", "--model.lambda_gg": "0"}

    refused = fit(tmp_path / "resumed", "--ckpt_path", ckpt, check=False, **longer)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("driml_pl: error: model.lambda_gg=0.0 is not allowed with --ckpt_path")
    assert not (tmp_path / "resumed").exists()

    fork = tmp_path / "fork"
    fit(fork, "--ckpt_path", ckpt, "--fork", "true", "--model.probe", "true", **longer)
    assert _digest(source) == before  # nothing of the source run was written
    config = yaml.safe_load(next(fork.glob("logs/version_0/config.yaml")).read_text())
    assert config["model"]["lambda_gg"] == 0.0 and config["model"]["critic_terms"] == ["gg"]
    with next(fork.glob("logs/version_0/metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    with next(source.glob("logs/version_0/metrics.csv")).open() as f:
        last = max(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss"))
    assert rows and min(int(r["step"]) for r in rows) > last  # the step count goes on from the checkpoint's
    for r in rows:
        assert float(r["probe/grad_encoder_gg"]) == 0.0 < float(r["probe/grad_encoder_c51"])  # weighted 0: exactly
        assert float(r["train/loss"]) == pytest.approx(float(r["train/c51_loss"]), rel=1e-6)
        assert float(r["train/nce_gg"]) > 0  # still computed and logged

    # the fork's own checkpoint holds the whole replay: it resumes in its directory, exactly (no refill warning)
    again = fit(fork, "--ckpt_path", "last", "--model.probe", "true", **{**longer, "--data.total_env_steps": "1280"})
    assert "without a saved replay" not in again.stderr
    assert len(list(fork.glob("logs/version_*/metrics.csv"))) == 2
