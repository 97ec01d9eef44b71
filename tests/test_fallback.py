"""A damaged newest checkpoint unit falls back to the one before it (issue 26.3).

The session's straight run (test_checkpoint.py: 72 updates, units at 20, 40, 60 and the end) leaves two units:
``last.ckpt`` (update 72) and ``previous.ckpt`` (update 60). Each case damages one kind of file of the newest unit
for real (truncates it, flips a byte, deletes it), then resumes with ``--ckpt_path last``: the resume must say in one
line which unit it skipped and why, go on from update 60 with the replay rolled back, and end bitwise equal to the
straight run (weights, Adam, every logged value). With both units damaged, the newest one's refusal of today.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_checkpoint import assert_same_run, final_state, fit, logged

from driml_pl.checkpoint.format import COMMIT_CRC

pytestmark = pytest.mark.slow


def _pointer(checkpoints: Path, name: str = "last.ckpt") -> dict:
    return torch.load(checkpoints / name, map_location="cpu", weights_only=True)["driml_unit"]


def _newest_unit(run: Path) -> Path:
    checkpoints = run / "checkpoints"
    return checkpoints / "units" / _pointer(checkpoints)["unit"] / "rank0"


def _newest_segment(run: Path) -> Path:
    return sorted((run / "checkpoints" / "replay" / "rank0").iterdir())[-1]  # only the newest unit references it


def _flip(path: Path) -> Path:
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 1
    path.write_bytes(bytes(body))
    return path


def _truncate(path: Path, keep: int = 1000) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _delete(path: Path) -> Path:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


# each kind of file of a unit -> how it is damaged (returns the path the one line must name)
DAMAGE = {
    "last_ckpt_truncated": lambda run: _truncate(run / "checkpoints" / "last.ckpt"),
    "last_ckpt_flipped": lambda run: _flip(run / "checkpoints" / "last.ckpt"),  # still loads: only its CRC tells
    "checksum_deleted": lambda run: _delete(_newest_unit(run) / COMMIT_CRC),
    "state_json_flipped": lambda run: _flip(_newest_unit(run) / "state.json"),
    "generator_flipped": lambda run: _flip(_newest_unit(run) / "generator.npy"),
    "env_state_truncated": lambda run: _truncate(_newest_unit(run) / "env_state.npy", 200),
    "unit_deleted": lambda run: _delete(_newest_unit(run)) / "state.json",
    "segment_frames_truncated": lambda run: _truncate(_newest_segment(run) / "frames.npy"),
    "segment_rewards_flipped": lambda run: _flip(_newest_segment(run) / "rewards.npy"),  # right size, wrong bytes
}
DEFAULT = ("last_ckpt_flipped", "state_json_flipped", "segment_rewards_flipped")


def _copy(straight: Path, tmp_path: Path) -> Path:
    run = tmp_path / "copy" / "run"
    run.parent.mkdir()
    subprocess.run(["cp", "-r", str(straight), str(run)], check=True)
    return run


def test_a_finished_run_keeps_two_units_the_newest_and_the_one_before(straight):
    checkpoints = straight / "checkpoints"
    last, previous = _pointer(checkpoints), _pointer(checkpoints, "previous.ckpt")
    assert (last["global_step"], previous["global_step"]) == (72, 60)
    assert {p.name for p in (checkpoints / "units").iterdir()} == {last["unit"], previous["unit"]}
    for unit in (last["unit"], previous["unit"]):
        assert (checkpoints / "units" / unit / "rank0" / COMMIT_CRC).is_file()
    assert not list(checkpoints.glob("*.tmp"))


@pytest.mark.parametrize("case", [c if c in DEFAULT else pytest.param(c, marks=pytest.mark.full) for c in DAMAGE])
def test_a_damaged_newest_unit_falls_back_to_the_one_before_and_resumes_exactly(straight, tmp_path, case):
    run = _copy(straight, tmp_path)
    damaged_unit = _pointer(run / "checkpoints")["unit"]
    named = DAMAGE[case](run)
    proc = fit(run, "--ckpt_path", "last")
    notes = [line for line in proc.stderr.splitlines() if "skipped the newest checkpoint unit" in line]
    assert len(notes) == 1, proc.stderr[-2000:]
    assert str(named) in notes[0]
    assert f"resuming from the one before it, {run / 'checkpoints' / 'previous.ckpt'} (update 60)" in notes[0]
    assert_same_run(straight, run)  # updates 61-72 again, from the unit of update 60 and its replay
    assert logged(run) == logged(straight)
    units = {p.name for p in (run / "checkpoints" / "units").iterdir()}
    assert damaged_unit not in units and len(units) == 2  # the damaged unit is gone once a new one is committed
    assert _pointer(run / "checkpoints", "previous.ckpt")["global_step"] == 60  # the unit it continued from


def test_with_both_units_damaged_the_resume_is_refused_in_one_line_naming_the_newest(straight, tmp_path):
    run = _copy(straight, tmp_path)
    named = _flip(_newest_unit(run) / "state.json")
    _truncate(run / "checkpoints" / "previous.ckpt")
    proc = fit(run, "--ckpt_path", "last", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"driml_pl: error: checkpoint file {named} is corrupt (CRC mismatch: truncated or altered)"]
    assert not (run / "logs" / "version_1").exists()  # refused before anything was written


@pytest.mark.full
def test_without_keep_previous_one_unit_is_kept_and_damage_is_refused(tmp_path):
    run = tmp_path / "run"
    fit(run, "--checkpoint.keep_previous", "false")
    checkpoints = run / "checkpoints"
    assert not (checkpoints / "previous.ckpt").exists()
    assert [p.name for p in (checkpoints / "units").iterdir()] == [_pointer(checkpoints)["unit"]]
    named = _flip(_newest_segment(run) / "rewards.npy")
    proc = fit(run, "--ckpt_path", "last", "--checkpoint.keep_previous", "false", check=False)
    assert proc.returncode == 2 and str(named) in proc.stderr, proc.stderr[-2000:]
    assert final_state(run)["global_step"] == 72
