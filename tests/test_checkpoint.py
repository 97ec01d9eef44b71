"""The checkpoint unit: real SIGKILLs after a mid-run checkpoint and at the dangerous moments of one, SIGTERM, corrupt
and planted files, settings that cannot fit, and the replay segments against the ring they came from."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_args
from support.faults import Faults, command
from test_replay import scripted

from driml_pl.checkpoint import CheckpointError, read_segments, write_segment
from driml_pl.data.replay import FrameReplay

# 8 envs, batch 16, ratio 2: one update per vector step after 64 warm-up env steps; 640 env steps -> 72 updates.
# Checkpoints every 20 updates (20, 40, 60) and at the end; epochs of 12 updates do not line up with them.
BUDGET = 640
# 4 updates per Lightning step (the paper's configs use 7): checkpoints fall between steps, at updates 20 and 40.
EXTRA = {
    "--checkpoint.every_n_updates": "20",
    "--trainer.enable_progress_bar": "false",
    "--data.updates_per_batch": "4",
}


def fit(run_dir: Path, *extra: str, faults: Faults | None = None, check: bool = True, **overrides: str):
    """A tiny fit through the CLI in a subprocess, with ``faults`` installed (`tests/support/faults.py`)."""
    args = command(faults or Faults(), [*tiny_args(run_dir, budget=BUDGET, **EXTRA, **overrides), *extra])
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    x, y = final_state(a), final_state(b)
    assert x["global_step"] == y["global_step"] == 72
    for key, value in x["state_dict"].items():
        assert torch.equal(value, y["state_dict"][key]), key
    states = (x["optimizer_states"][0]["state"].values(), y["optimizer_states"][0]["state"].values())
    for sa, sb in zip(*states, strict=True):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


def logged(run_dir: Path) -> dict[int, dict[str, str]]:
    """The training metrics of every logged step over all log versions (a resume appends a version)."""
    rows: dict[int, dict[str, str]] = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    rows[int(row["step"])] = {k: v for k, v in row.items() if k.startswith(("train/", "rollout/"))}
    return rows


@pytest.mark.slow
@pytest.mark.full  # the default session kills inside the checkpoint (the harder case) and checks the same
def test_sigkill_after_a_mid_run_checkpoint_resumes_to_the_same_weights_optimizer_and_metrics(straight, tmp_path):
    run = tmp_path / "run"
    crash = fit(run, faults=Faults(crash_at="after_commit", crash_after=2), check=False)
    assert crash.returncode == -signal.SIGKILL  # a real kill, right after the second checkpoint (update 40)
    assert final_state(run)["global_step"] == 40
    fit(run, "--ckpt_path", "last")
    assert_same_run(straight, run)
    assert logged(run) == logged(straight)  # every logged value, across the kill


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["mid_flush", pytest.param("before_commit", marks=pytest.mark.full)])
def test_a_kill_inside_a_checkpoint_leaves_the_previous_one_resumable(straight, tmp_path, moment):
    run = tmp_path / "run"
    crash = fit(run, faults=Faults(crash_at=moment, crash_after=2), check=False)
    assert crash.returncode == -signal.SIGKILL
    assert final_state(run)["global_step"] == 20  # the second checkpoint never committed
    fit(run, "--ckpt_path", "last")
    assert_same_run(straight, run)
    assert logged(run) == logged(straight)  # every logged value, across the kill


@pytest.mark.slow
@pytest.mark.full  # the same handler as the first Ctrl-C (test_lifecycle.py, default session), with exit 143
def test_sigterm_writes_a_checkpoint_and_exits_143_then_resumes_exactly(straight, tmp_path):
    run = tmp_path / "run"
    args = command(Faults(slow=0.05), tiny_args(run, budget=BUDGET, **EXTRA))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first checkpoint (update 20) is written: the run is mid-way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    step = final_state(run)["global_step"]
    assert 20 < step < 72
    fit(run, "--ckpt_path", "last")
    assert_same_run(straight, run)


@pytest.mark.slow
@pytest.mark.full
def test_a_sigterm_that_comes_with_the_last_update_is_a_finished_run_exit_0(straight, tmp_path):
    """Updates 69-72 are the last Lightning step: the SIGTERM's checkpoint is the end of the budget, so the run
    finished (exit 0, no requeue by a scheduler's trap) and equals the straight run."""
    run = tmp_path / "run"
    proc = fit(run, faults=Faults(signal_at=70), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "driml_pl: SIGTERM came with the budget's last update: the run finished" in proc.stderr
    assert "stopped by SIGTERM" not in proc.stderr
    assert final_state(run)["global_step"] == 72
    assert_same_run(straight, run)


def _plant_pickle(run: Path) -> str:
    torch.save({"state_dict": {}, "payload": _Payload(str(run.parent / "pwned"))}, run / "checkpoints" / "last.ckpt")
    return "pickled objects"


# (settings that cannot fit the saved state, or a planted pickle) -> what the one line must name. The default
# session runs one of each kind; `nox -s tests_full` runs them all. A damaged file falls back to the unit before it,
# or, with both damaged, is refused the same way: tests/test_fallback.py.
REFUSALS = {
    "num_envs": (["--data.env.num_envs", "4"], None, "data.env.num_envs=4"),
    "replay_size": (["--data.replay_size", "4096"], None, "data.replay_size=4096"),
    "game": (["--data.env.game", "coinrun"], None, "data.env.game='coinrun'"),
    "planted_pickle": ([], _plant_pickle, None),
}
DEFAULT_REFUSALS = ("num_envs", "planted_pickle")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c if c in DEFAULT_REFUSALS else pytest.param(c, marks=pytest.mark.full) for c in REFUSALS]
)
def test_planted_and_misfit_checkpoints_are_refused_in_one_line(straight, tmp_path, case):
    extra, damage, named = REFUSALS[case]
    run = tmp_path / "copy" / "run"
    run.parent.mkdir()
    subprocess.run(["cp", "-r", str(straight), str(run)], check=True)
    if damage is not None:
        named = str(damage(run))  # the damaged file's path (or the planted payload's refusal)
    proc = fit(run, "--ckpt_path", "last", *extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert named in lines[0]
    assert not (run.parent / "pwned").exists()  # a planted payload never runs: refused before anything is loaded


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("capacity", [30, 500])
def test_segments_written_incrementally_rebuild_the_ring(tmp_path, capacity):
    """Checkpoints at irregular times, the ring wrapping between them: the segments rebuild every retained slot."""
    source, _ = scripted(capacity=capacity, n_step=3, max_k=4)  # 90 steps of 3 envs
    root = tmp_path / "replay"
    root.mkdir()
    segments, flushed = [], -1
    steps = source.t
    for cut in (7, 8, 40, 77, steps):  # checkpoint times (the script's replay is read at each)
        first = max(flushed + 1, cut - capacity + 1, 0)
        view = _truncated(source, cut)
        segments.append(write_segment(view, root, first, cut))
        flushed = cut
    restored = FrameReplay(3, capacity, 3, 0.9, 4)
    read_segments(restored, root, [s for s in segments if s["last"] >= steps - capacity + 1], steps)
    restored.t = steps
    lo, hi = source.valid_range()
    assert (restored.valid_range()) == (lo, hi)
    times = np.arange(max(0, steps - capacity + 1), steps + 1)
    for column in ("frames", "firsts"):
        a, b = getattr(source, column), getattr(restored, column)
        assert torch.equal(a[times % capacity], b[times % capacity]), column
    for column in ("actions", "rewards", "dones"):  # final only up to t - 1
        a, b = getattr(source, column), getattr(restored, column)
        assert torch.equal(a[times[:-1] % capacity], b[times[:-1] % capacity]), column
    with pytest.raises(CheckpointError, match="frames.npy"):
        path = root / segments[-1]["name"] / "frames.npy"
        path.write_bytes(path.read_bytes()[:-1])
        read_segments(FrameReplay(3, capacity, 3, 0.9, 4), root, segments[-1:], steps)


def _truncated(source: FrameReplay, t: int) -> FrameReplay:
    """The source ring as it was at time t (the script is deterministic: rebuild it up to t)."""
    replay, _ = scripted(capacity=source.capacity, n_step=3, max_k=4, steps=t)
    return replay


@pytest.mark.slow
def test_without_the_replay_checkpoints_are_small_and_a_resume_refills_it_with_a_warning(tmp_path):
    run = tmp_path / "run"
    crash = fit(run, "--checkpoint.save_replay", "false",
                faults=Faults(crash_at="after_commit", crash_after=2), check=False)  # fmt: skip
    assert crash.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "replay").exists()  # no replay segments at all
    unit_bytes = sum(p.stat().st_size for p in (run / "checkpoints" / "units").rglob("*") if p.is_file())
    assert unit_bytes < 1_000_000  # counters, rngs, the emulator states: against 25 MB of replay
    resumed = fit(run, "--checkpoint.save_replay", "false", "--ckpt_path", "last")
    assert "refilled" in resumed.stderr and "not an exact continuation" in resumed.stderr
    state = final_state(run)
    assert state["global_step"] < 72  # the refill's env steps count in the budget: fewer updates than straight
    assert state["global_step"] > 40
    rows = logged(run)
    assert float(rows[max(rows)]["rollout/env_steps"]) == BUDGET
