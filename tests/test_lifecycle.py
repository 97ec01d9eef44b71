"""How a real fit ends (issue 19): Ctrl-C once and twice, a full filesystem (a size-limited tmpfs), and the run
directory's lock against a second fit and after a SIGKILL. Every run is a real CLI subprocess on real Procgen, and
every resume is checked bitwise against the same run made straight through."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_args
from support.faults import Faults, command
from support.mounts import tmpfs
from test_checkpoint import BUDGET, EXTRA, assert_same_run, final_state, fit

from driml_pl.checkpoint import check_resumable
from driml_pl.runlock import RunLock, RunLockedError, holds_run_lock, lock_holder

SLOW = Faults(slow=0.3)  # 4 updates a step: ~1.5 s between the checkpoints of updates 20 and 40


def start(run: Path, *extra: str, faults: Faults | None = None) -> subprocess.Popen:
    """A fit as a terminal starts it: SIGINT at its default (a background child of a script would ignore it);
    ``faults`` from `tests/support/faults.py`."""
    args = command(faults or Faults(), [*tiny_args(run, budget=BUDGET, **EXTRA), *extra])
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def kept(ckpt: Path, step: int) -> str:
    return f"the last checkpoint is {ckpt} (update {step}), left as it was"


def assert_only_the_committed_unit(checkpoints: Path) -> None:
    """The directory holds last.ckpt and previous.ckpt (once two units were committed), the units they name and
    exactly the segments those units reference: no .tmp file, no temporary directory, no other unit, no stray
    segment."""
    files = ["last.ckpt"] + (["previous.ckpt"] if (checkpoints / "previous.ckpt").exists() else [])
    units = {torch.load(checkpoints / f, map_location="cpu", weights_only=True)["driml_unit"]["unit"] for f in files}
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([*files, "replay", "units"])
    assert {p.name for p in (checkpoints / "units").iterdir()} == units
    segments: set[str] = set()
    for unit in units:
        assert [p.name for p in (checkpoints / "units" / unit).iterdir()] == ["rank0"]
        state = json.loads((checkpoints / "units" / unit / "rank0" / "state.json").read_text())
        segments.update(s["name"] for s in state["replay"]["segments"])
    assert {p.name for p in (checkpoints / "replay" / "rank0").iterdir()} == segments
    check_resumable(checkpoints / "last.ckpt", {})


# ------------------------------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes_exactly(straight, tmp_path):
    run = tmp_path / "run"
    proc = start(run, faults=SLOW)
    wait_for(run / "checkpoints" / "last.ckpt", proc)  # the checkpoint of update 20: the run is mid-way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    step = final_state(run)["global_step"]
    assert 20 < step < 72
    ckpt = run / "checkpoints" / "last.ckpt"
    expected = f"driml_pl: stopped by Ctrl-C: wrote the checkpoint {ckpt} (update {step}); resume with --ckpt_path last"
    assert last_line(err) == expected
    assert f"Ctrl-C: writing the checkpoint of update {step}, then stopping" in err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    assert_only_the_committed_unit(run / "checkpoints")
    fit(run, "--ckpt_path", "last")
    assert_same_run(straight, run)


@pytest.mark.slow
@pytest.mark.full  # the default session runs the harder case: the second Ctrl-C inside the first one's checkpoint
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_previous_checkpoint(straight, tmp_path):
    run = tmp_path / "run"
    proc = start(run, faults=SLOW)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # before the step ends: nothing more is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert last_line(err) == f"driml_pl: stopped at once by Ctrl-C; {kept(ckpt, 20)}"
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    assert final_state(run)["global_step"] == 20
    assert_only_the_committed_unit(run / "checkpoints")
    fit(run, "--ckpt_path", "last")
    assert_same_run(straight, run)


@pytest.mark.slow
def test_a_second_ctrl_c_in_the_middle_of_the_first_ones_checkpoint_discards_that_unit(straight, tmp_path):
    """The first Ctrl-C's unit (the run's second) gets the second Ctrl-C while its first replay file is written."""
    run = tmp_path / "run"
    proc = start(run, faults=Faults(slow=0.3, crash_at="mid_flush", crash_after=2, crash_signal="SIGINT"))
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C: writing the checkpoint of update" in err  # the first one's unit was being written
    ckpt = run / "checkpoints" / "last.ckpt"
    assert last_line(err) == f"driml_pl: stopped at once by Ctrl-C; {kept(ckpt, 20)}"
    assert final_state(run)["global_step"] == 20
    assert_only_the_committed_unit(run / "checkpoints")  # the half-written unit and its segment are gone
    fit(run, "--ckpt_path", "last")
    assert_same_run(straight, run)


# ------------------------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MB filesystem (tmpfs), unmounted afterwards."""
    with tmpfs(tmp_path / "disk", "48m") as mount:
        yield mount


def _fill(mount: Path, leave: int) -> Path:
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, shutil.disk_usage(mount).free - leave)
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("where", [pytest.param("segment", marks=pytest.mark.full), "last_ckpt"])
def test_a_full_disk_stops_with_one_line_exit_28_no_partial_files_and_resumes(straight, small_disk, where):
    run = small_disk / "run"
    proc = start(run, faults=SLOW)
    ckpt = run / "checkpoints" / "last.ckpt"
    wait_for(ckpt, proc)  # update 20's unit is committed; fill the disk before update 40's
    if where == "segment":
        leave = 256 << 10  # the next replay segment alone is ~2 MB
    else:  # room for the segment and the unit's state, not for last.ckpt (the 37 MB last.ckpt.tmp)
        segments = sorted((straight / "checkpoints" / "replay" / "rank0").iterdir())
        segment = sum(p.stat().st_size for p in segments[1].iterdir())
        leave = segment + (1 << 20) + ckpt.stat().st_size // 2
    filler = _fill(small_disk, leave)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 28, err[-3000:]
    line = last_line(err)
    match = re.fullmatch(
        rf"driml_pl: error: no space left on device writing the checkpoint of update 40 to {run / 'checkpoints'}"
        r": it needed about (?P<need>[\d.,]+) MB, (?P<free>[\d.,]+) MB were free; its partial "
        rf"files were removed and the last good checkpoint is {ckpt} \(update 20\), left as it was; free space, then "
        r"resume with --ckpt_path last",
        line,
    )
    print(f"\n{where}: {line}")
    assert match, line
    assert "Traceback" not in err
    needed, free = float(match["need"]), float(match["free"])
    assert needed > free  # what the unit needed did not fit
    assert free == pytest.approx(shutil.disk_usage(small_disk).free / (1 << 20), abs=0.6)
    assert needed > 2.0 + ckpt.stat().st_size / (1 << 20) * 0.9  # the segment (~2 MB) and about the last.ckpt size
    assert final_state(run)["global_step"] == 20
    assert_only_the_committed_unit(run / "checkpoints")
    filler.unlink()
    fit(run, "--ckpt_path", "last")
    assert_same_run(straight, run)


# ------------------------------------------------------------------------------------------ the run's lock
@pytest.mark.slow
def test_a_second_fit_of_a_running_directory_is_refused_and_a_killed_holder_leaves_no_lock(straight, tmp_path):
    run = tmp_path / "run"
    first = start(run, faults=Faults(slow=2))  # alive for ~40 s: longer than the second fit's start
    wait_for(run / "checkpoints" / "last.ckpt", first)
    assert lock_holder(run) == f"host {socket.gethostname()}, pid {first.pid}"
    versions = sorted(p.name for p in (run / "logs").iterdir())
    second = fit(run, "--ckpt_path", "last", check=False)  # a requeued copy of the same run
    assert second.returncode == 2, second.stderr[-3000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr[-3000:]  # nothing else printed either
    assert lines[0].startswith(f"driml_pl: error: trainer.default_root_dir={run} is in use by another fit ")
    assert f"(host {socket.gethostname()}, pid {first.pid};" in lines[0]
    assert sorted(p.name for p in (run / "logs").iterdir()) == versions  # no logs/version_N of its own
    assert first.poll() is None  # the first goes on
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (run / "run.lock").exists() and lock_holder(run) is None  # the file stays, the kernel dropped the lock
    fit(run, "--ckpt_path", "last")  # the next fit takes the lock and completes the run
    assert_same_run(straight, run)
    assert not (run / "run.lock").exists()  # a fit that ends removes its lock file


def test_the_lock_is_exclusive_released_on_exit_and_taken_by_global_rank_zero_only(tmp_path, monkeypatch):
    run = tmp_path / "a" / "run"
    with RunLock(run) as lock:
        assert lock.held and lock_holder(run) == f"host {socket.gethostname()}, pid {os.getpid()}"
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}; lock file {run / 'run.lock'}"):
            RunLock(run).acquire(wait_s=0.1)  # another open file description: refused even in-process
    assert lock_holder(run) is None and not (tmp_path / "a").exists()  # nothing was left behind
    for name, value, holds in [("LOCAL_RANK", "1", False), ("RANK", "3", False), ("NODE_RANK", "1", False),
                               ("SLURM_PROCID", "2", False), ("LOCAL_RANK", "0", True)]:  # fmt: skip
        monkeypatch.setenv(name, value)
        assert holds_run_lock() is holds, (name, value)
        monkeypatch.delenv(name)
    assert holds_run_lock()


def test_each_stop_prints_one_line_and_its_documented_exit_code(capsys):
    from driml_pl.checkpoint.diskfull import DiskFullError
    from driml_pl.interrupt import Interrupted
    from driml_pl.lifecycle import EXIT_CODES, stopped

    assert stopped(DiskFullError("no space left on device writing ...")) == EXIT_CODES["disk full"] == 28
    assert stopped(OSError(28, "No space left on device", "/run/logs/version_0/metrics.csv")) == 28
    assert stopped(Interrupted("/run/checkpoints/last.ckpt (update 20)")) == EXIT_CODES["ctrl-c"] == 130
    assert stopped(Interrupted(None)) == 130
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "driml_pl: error: no space left on device writing ...",
        "driml_pl: error: no space left on device writing /run/logs/version_0/metrics.csv: the run stopped; free "
        "space, then resume with --ckpt_path last (the last committed checkpoint is left as it was)",
        "driml_pl: stopped at once by Ctrl-C; the last checkpoint is /run/checkpoints/last.ckpt (update 20), left as "
        "it was",
        "driml_pl: stopped at once by Ctrl-C; no checkpoint of this run was written",
    ]
    assert sorted(EXIT_CODES.values()) == [0, 1, 2, 3, 28, 130, 143]  # all distinct
