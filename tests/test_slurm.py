"""The grid through a real SLURM (issue 18.1, 18.2): `tools/slurm/up.sh` brings up a one-node cluster, and these
tests submit with real `sbatch`/`srun` and read the outcome from the run directories and `scontrol show job`.

Opt-in (`nox -s slurm`, or DRIML_SLURM=1 with a cluster up): minutes of jobs, so never part of the default session.
With DRIML_SLURM=1 and no cluster the tests fail rather than skip. Tasks are CPU-only (`--gpus-per-task 0`) tiny
runs of the paper configs (conftest's `tiny_args`, `--model.compile false`); slow steps (`tests/support/faults.py`, a
sleep per step, through the grid's `--python`) make a run last long enough to be requeued in the middle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_args
from support.faults import Faults, python_with_faults

from driml_pl.tools.launch import RESERVED, main
from driml_pl.tools.report import load_run

pytestmark = pytest.mark.skipif(os.environ.get("DRIML_SLURM") != "1", reason="opt-in: nox -s slurm (DRIML_SLURM=1)")
GAME = "dodgeball"  # a random policy ends episodes within a few steps, so a tiny run logs returns
TASK = ["--gpus-per-task", "0", "--cpus-per-task", "1", "--mem-gb", "2"]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    assert shutil.which("sbatch"), "DRIML_SLURM=1 but no sbatch on PATH: run `bash tools/slurm/up.sh`"
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.split()
    assert set(state) & {"idle", "mixed", "allocated"}, f"no node up (sinfo: {state}): run `bash tools/slurm/up.sh`"


def overrides(budget: int, **extra: object) -> list[str]:
    """conftest's tiny-run flags for a paper config, less the ones the launcher sets per run."""
    base = {"--model.compile": "false", "--checkpoint.every_n_updates": 12, **extra}
    args = tiny_args(Path("unused"), budget=budget, **base)[1:]
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
    return [x for key, value in pairs if key not in RESERVED for x in (key, value)]


def job(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o``: one dict per record (an array job: one per task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]


def wait_jobs(*job_ids: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < end, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(2)


def submitted(out: str, what: str = "array job") -> str:
    match = re.search(rf"submitted {what} (\d+)", out)
    assert match, out
    return match.group(1)


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = last(a), last(b)
    assert x["global_step"] == y["global_step"] and x["state_dict"].keys() == y["state_dict"].keys()
    for key, value in x["state_dict"].items():
        torch.testing.assert_close(y["state_dict"][key], value, rtol=0, atol=0, msg=key)


def grid(tmp: Path, root: str, *args: str, budget: int = 256, capsys: pytest.CaptureFixture[str],
         slow: float = 0.0) -> str:  # fmt: skip
    """``grid`` on the local cluster; with ``slow`` every Lightning step of the fits takes that many seconds more
    (`tests/support/faults.py`, through the grid's ``--python``)."""
    capsys.readouterr()
    python = ["--python", str(python_with_faults(tmp, Faults(slow=slow)))] if slow else []
    assert main(["--root", str(tmp / root), "--games", GAME, *TASK, *python, *args, "--", *overrides(budget)]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- the array
def test_grid_submit_runs_the_array_skips_finished_runs_and_reports_after(tmp_path: Path, capsys) -> None:
    root, report = tmp_path / "runs", tmp_path / "report"
    cells = [(m, s) for m in ("c51", "randk") for s in (0, 1)]
    args = ["--methods", "c51,randk", "--seeds", "0,1", "--submit", "--time", "00:10:00", "--report", str(report)]
    out = grid(tmp_path, "runs", *args, capsys=capsys)
    assert "4 runs: 0 finished (skipped), 0 to resume, 4 to start" in out and "(4 array tasks)" in out
    array, rep = submitted(out), submitted(out, "report job")
    [pending] = job(rep)
    assert pending["Dependency"].startswith(f"afterany:{array}_"), pending["Dependency"]  # waits for the array
    wait_jobs(array, rep)
    tasks = job(array)
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2, 3]
    assert {(t["JobState"], t["ExitCode"]) for t in tasks} == {("COMPLETED", "0:0")}
    [done] = job(rep)
    assert done["JobState"] == "COMPLETED" and done["StartTime"] >= max(t["EndTime"] for t in tasks)
    for method, seed in cells:
        run = load_run(root / method / GAME / f"seed{seed}")
        assert run.reached_budget and run.total_env_steps == 256
    assert "| dodgeball | " in (report / "report.md").read_text()

    # one run lost: the second submit starts it alone; the finished ones are skipped (no new version)
    shutil.rmtree(root / "randk" / GAME / "seed1")
    out = grid(tmp_path, "runs", "--methods", "c51,randk", "--seeds", "0,1", "--submit", capsys=capsys)
    assert "4 runs: 3 finished (skipped), 0 to resume, 1 to start" in out and "(1 array tasks)" in out
    second = submitted(out)
    wait_jobs(second)
    assert [(t["JobState"], t["ExitCode"]) for t in job(second)] == [("COMPLETED", "0:0")]
    for method, seed in cells:
        run_dir = root / method / GAME / f"seed{seed}"
        assert load_run(run_dir).reached_budget and len(list((run_dir / "logs").glob("version_*"))) == 1
    # all finished: nothing is submitted
    out = grid(tmp_path, "runs", "--methods", "c51,randk", "--seeds", "0,1", "--submit", capsys=capsys)
    assert "4 runs: 4 finished (skipped), 0 to resume, 0 to start" in out and "nothing to run" in out
    assert "submitted" not in out


# ---------------------------------------------------------------------------------------------- requeue
def _running_with_checkpoint(job_id: str, run_dir: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not ((run_dir / "checkpoints" / "last.ckpt").is_file() and job(job_id)[0]["JobState"] == "RUNNING"):
        assert time.monotonic() < end, job(job_id)
        time.sleep(1)


def test_a_requeued_task_resumes_from_last_ckpt_and_ends_with_the_weights_of_one_never_requeued(
    tmp_path: Path, capsys
) -> None:
    args = ["--methods", "c51", "--seeds", "0", "--submit", "--time", "00:10:00"]  # 0.3 s/step: about 40 s
    requeued = submitted(grid(tmp_path, "requeued", *args, budget=1024, capsys=capsys, slow=0.3))
    straight = submitted(grid(tmp_path, "straight", *args, budget=1024, capsys=capsys, slow=0.3))
    run_dir = tmp_path / "requeued" / "c51" / GAME / "seed0"
    _running_with_checkpoint(requeued, run_dir)
    subprocess.run(["scontrol", "requeue", f"{requeued}_0"], check=True)
    wait_jobs(requeued, straight)
    [task] = job(requeued)
    assert (task["JobState"], task["ExitCode"], task["Restarts"]) == ("COMPLETED", "0:0", "1")
    log = (run_dir / "launch.log").read_text()
    assert log.count("\n=== ") == 2 and " fresh: " in log and " resume: " in log
    assert "stopped by SIGTERM after writing a checkpoint" in log
    assert "TERM: passed on to the runs" in next(run_dir.parents[2].glob("_grid/*/slurm-*.out")).read_text()
    assert last(run_dir)["global_step"] == (1024 - 64) * 2 // 16
    assert_same_weights(tmp_path / "straight" / "c51" / GAME / "seed0", run_dir)


def test_a_task_at_its_time_limit_checkpoints_is_requeued_and_finishes(tmp_path: Path, capsys) -> None:
    """--time 00:01:30 (SLURM rounds it up to 2 minutes) with the notice 30 s before: SLURM sends USR1 30-90 s into
    the task (its resolution is a minute); a run of about 1.5 minutes of training needs at least one requeue."""
    args = ["--methods", "c51", "--seeds", "0", "--submit", "--time", "00:01:30", "--requeue-before", "30"]
    array = submitted(grid(tmp_path, "runs", *args, budget=1024, capsys=capsys, slow=0.6))
    wait_jobs(array, timeout=900)
    [task] = job(array)
    restarts = int(task["Restarts"])
    # the last attempt may get its notice too, while the run finishes (exit code 0: no requeue); when finishing
    # (the final evaluation, checkpoint and exit) outlasts the notice, SLURM records TIMEOUT for a finished run
    assert task["JobState"] in ("COMPLETED", "TIMEOUT") and restarts >= 1 and task["TimeLimit"] == "00:02:00", task
    run_dir = tmp_path / "runs" / "c51" / GAME / "seed0"
    out = next((tmp_path / "runs").glob("_grid/*/slurm-*.out")).read_text()
    assert out.count("USR1 (time limit): checkpoint, then requeue") in (restarts, restarts + 1)
    assert out.count("runs stopped (exit code 143): requeue") == restarts
    assert "c51/dodgeball/seed0: exit code 0\n" in out
    log = (run_dir / "launch.log").read_text()
    assert log.count(" resume: ") == int(task["Restarts"])
    assert log.count("stopped by SIGTERM after writing a checkpoint") == int(task["Restarts"])
    assert load_run(run_dir).reached_budget and last(run_dir)["global_step"] == 120


# ---------------------------------------------------------------------------------------------- submitit
def test_the_submitit_backend_runs_the_grid_on_the_same_cluster(tmp_path: Path, capsys) -> None:
    """executor auto finds sbatch: two runs, one per task, as a submitit array; --wait, then the report."""
    pytest.importorskip("submitit")
    report = tmp_path / "report"
    args = ["--methods", "c51,randk", "--seeds", "0", "--backend", "submitit", "--time", "00:10:00", "--wait",
            "--report", str(report)]  # fmt: skip
    out = grid(tmp_path, "runs", *args, capsys=capsys)
    match = re.search(r"submitted 2 tasks: (\d+)_0, (\d+)_1 ", out)
    assert match and match.group(1) == match.group(2), out
    wait_jobs(match.group(1))  # --wait returns once the results are written; SLURM may still list a task RUNNING
    tasks = job(match.group(1))
    assert sorted((t["ArrayTaskId"], t["JobState"], t["ExitCode"], t["JobName"]) for t in tasks) == [
        ("0", "COMPLETED", "0:0", "submitit"), ("1", "COMPLETED", "0:0", "submitit")]  # fmt: skip
    for method in ("c51", "randk"):
        assert load_run(tmp_path / "runs" / method / GAME / "seed0").reached_budget
    assert "| dodgeball | " in (report / "report.md").read_text()


def test_submitit_time_out_stops_the_fits_with_a_checkpoint_and_requeues(tmp_path: Path, capsys) -> None:
    """submitit's USR2 notice reaches every process of the step: the fits ignore it, and `GridTask.checkpoint`
    stops them with SIGTERM (a checkpoint each) before submitit requeues the task, which resumes them."""
    pytest.importorskip("submitit")
    args = ["--methods", "c51", "--seeds", "0", "--backend", "submitit", "--time", "00:01:30", "--requeue-before",
            "30", "--wait"]  # fmt: skip
    out = grid(tmp_path, "runs", *args, budget=1024, capsys=capsys, slow=0.6)
    match = re.search(r"submitted 1 tasks: (\d+) ", out)
    assert match, out
    wait_jobs(match.group(1))  # --wait returns once the result is written; SLURM may still list the job RUNNING
    [task] = job(match.group(1))
    assert task["JobState"] == "COMPLETED" and int(task["Restarts"]) >= 1 and task["TimeLimit"] == "00:02:00", task
    run_dir = tmp_path / "runs" / "c51" / GAME / "seed0"
    log = (run_dir / "launch.log").read_text()
    stops = log.count("stopped by SIGTERM after writing a checkpoint")
    assert stops >= 1 and log.count(" resume: ") >= stops - 1  # a stop at the budget's last update needs no resume
    notes = "".join(p.read_text() for p in (run_dir.parents[2] / "_grid").glob("*/submitit/*_log.out"))
    assert notes.count("Calling checkpoint method.") == int(task["Restarts"]) == notes.count("Requeued job")
    assert load_run(run_dir).reached_budget and last(run_dir)["global_step"] == 120


# ---------------------------------------------------------------------------------------------- srun, 2 tasks
def test_srun_two_tasks_make_one_ddp_run_equal_to_two_local_ranks(tmp_path: Path) -> None:
    """`srun` starts the two ranks (Lightning reads SLURM_PROCID/SLURM_NTASKS); the run makes the same updates on the
    same global budget as two ranks Lightning starts itself, and ends with bitwise the same weights."""
    ddp = {"--trainer.accelerator": "cpu", "--trainer.devices": 2, "--trainer.strategy": "ddp",
           "--trainer.enable_progress_bar": "false"}  # fmt: skip
    srun_dir, local_dir = tmp_path / "srun", tmp_path / "local"
    fit = [sys.executable, "-m", "driml_pl", *tiny_args(srun_dir, budget=512, **ddp)]
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--mem=4G", "--time=00:10:00", f"--output={tmp_path}/srun-%j.out",
                          f"--wrap=srun {' '.join(fit)}"], check=True, capture_output=True, text=True,
                         cwd=ROOT)  # fmt: skip
    job_id = sub.stdout.strip()
    local = subprocess.run([sys.executable, "-m", "driml_pl", *tiny_args(local_dir, budget=512, **ddp)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert local.returncode == 0, local.stderr[-2000:]
    wait_jobs(job_id)
    [task] = job(job_id)
    assert (task["JobState"], task["ExitCode"], task["NumTasks"]) == ("COMPLETED", "0:0", "2"), task
    units = list((srun_dir / "checkpoints" / "units").iterdir())
    state = [json.loads((units[0] / f"rank{r}" / "state.json").read_text()) for r in (0, 1)]
    assert [s["stream"]["collector"]["env_steps"] for s in state] == [256, 256]  # the global budget, halved
    assert last(srun_dir)["global_step"] == (512 - 64) * 2 // 16
    assert_same_weights(local_dir, srun_dir)
