"""`driml_pl grid`: the SLURM array script for the paper's grid, and a tiny grid run for real.

The real run starts each array task the way the scheduler would: wave 1 runs the generated ``sbatch`` script with
bash (``SLURM_ARRAY_TASK_ID`` set, no sbatch), wave 2 goes through submitit's local executor (real subprocesses).
Dodgeball, because a random policy ends episodes there within a few steps, so a 256-step run logs returns.
"""

from __future__ import annotations

import json
import logging.config
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

from driml_pl.tools.launch import RESERVED, main
from driml_pl.tools.report import load_run

pytestmark = pytest.mark.slow


def _overrides(budget: int, **extra: object) -> list[str]:
    """conftest's tiny-run flags, less the ones the launcher sets per run."""
    args = tiny_args(Path("unused"), budget=budget, **extra)[1:]
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
    return [x for key, value in pairs if key not in RESERVED for x in (key, value)]


def _plan(root: Path) -> tuple[Path, dict]:
    [plan] = sorted(root.glob("_grid/*/plan.json"))[-1:]
    return plan, json.loads(plan.read_text())


def test_submitits_logging_config_leaves_the_stderr_absl_writes_to_open(capsys: pytest.CaptureFixture[str]) -> None:
    """Importing submitit runs ``logging.config.dictConfig``, which closes every handler; absl's (rliable imports it)
    closed its stream when that was not the ``sys.stderr`` of the moment, and under pytest that was the capture file
    of the whole session (conftest points it at the process's stderr)."""
    absl_logging = pytest.importorskip("absl.logging")
    import driml_pl.tools.intervals  # noqa: F401  (imports rliable, and absl with it)

    stream = absl_logging.get_absl_handler().python_handler.stream
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    assert stream is sys.__stderr__ and not stream.closed


def test_slurm_array_script_for_the_paper_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    extra = ["--trainer.precision", "bf16-mixed"]
    args = ["--root", str(root), "--runs-per-gpu", "3", "--partition", "gpu", "--max-parallel", "20", "--", *extra]
    assert main(args) == 0
    assert "240 runs: 0 finished (skipped), 0 to resume, 240 to start" in capsys.readouterr().out
    plan, spec = _plan(root)
    script = (plan.parent / "array.sbatch").read_text()
    task_line = f'-m driml_pl grid task {plan} --index "$SLURM_ARRAY_TASK_ID" &'
    for line in ("#SBATCH --array=0-79%20", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@90", task_line):  # fmt: skip
        assert line in script, line
    # USR1 (the time-limit notice) stops the runs with a checkpoint first, then requeues; TERM is passed on
    assert 'requeue=1; kill -TERM "$task"\' USR1' in script and 'kill -TERM "$task" 2>/dev/null\' TERM' in script
    assert script.index('  wait "$task"') < script.index(
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'
    )
    tasks = spec["tasks"]
    assert len(tasks) == 80 and all(len(t) == 3 for t in tasks) and spec["runs_per_gpu"] == 3
    cells = {(r["method"], r["game"], r["seed"]) for t in tasks for r in t}
    assert len(cells) == 240 and {m for m, _, _ in cells} == {"c51", "noact", "randk", "fix", "ada"}
    first = tasks[0][0]
    assert (first["method"], first["game"], first["seed"]) == ("c51", "bigfish", 0)
    assert first["run_dir"] == str(root / "c51" / "bigfish" / "seed0") and first["budget"] == 50_000_000
    command = next(line for line in script.splitlines() if line.startswith("# task 79: ada/starpilot/seed2: "))
    assert command.endswith(f"--seed_everything 2 --trainer.default_root_dir {root}/ada/starpilot/seed2 "
                            "--trainer.precision bf16-mixed")  # fmt: skip
    assert "conf/paper/ada.yaml --data.env.game starpilot" in command
    # flags the launcher owns are refused, as is an unknown method
    assert main(["--root", str(root), "--dry-run", "--", "--data.env.game", "coinrun"]) == 2
    assert main(["--root", str(root), "--dry-run", "--methods", "curl"]) == 2
    capsys.readouterr()
    assert main(["--root", str(root), "--dry-run", "--time", "00:01:30", "--requeue-before", "120"]) == 2
    assert capsys.readouterr().err == ("driml_pl grid: error: --requeue-before 120 is not allowed: must be > 0 and "
                                       "below --time 00:01:30 (120 s)\n")  # fmt: skip
    assert main(["--root", str(root), "--dry-run", "--conf-dir", str(root / "nowhere")]) == 2
    assert capsys.readouterr().err == f"driml_pl grid: error: --conf-dir {root / 'nowhere'}: no such directory\n"


def test_tiny_grid_runs_resumes_skips_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("submitit")
    root, report = tmp_path / "runs", tmp_path / "report"
    grid = ["--root", str(root), "--games", "dodgeball", "--seeds", "0", "--gpus-per-task", "0"]
    c51, randk = root / "c51" / "dodgeball" / "seed0", root / "randk" / "dodgeball" / "seed0"

    # wave 1: c51 stops after one epoch (12 of 24 updates): a checkpoint, not finished. The array script runs in bash.
    assert main([*grid, "--methods", "c51", "--", *_overrides(256, **{"--trainer.max_epochs": 1})]) == 0
    plan, _ = _plan(root)
    env = dict(os.environ, SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="0")
    proc = subprocess.run(["bash", str(plan.parent / "array.sbatch")], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "c51/dodgeball/seed0: fresh:" in proc.stdout
    assert (c51 / "checkpoints" / "last.ckpt").is_file() and not load_run(c51).reached_budget

    # wave 2: both methods, two runs packed in one task, through submitit's local executor; then the report
    capsys.readouterr()
    args = [*grid, "--methods", "c51,randk", "--runs-per-gpu", "2", "--backend", "submitit", "--executor", "local",
            "--time", "00:05:00", "--wait", "--report", str(report), "--", *_overrides(256)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs: 0 finished (skipped), 1 to resume, 1 to start" in out and "submitted 1 tasks" in out
    resumed = (c51 / "launch.log").read_text()
    assert "resume:" in resumed and resumed.rstrip().count("--ckpt_path last") >= 1
    assert "fresh:" in (randk / "launch.log").read_text()
    for run_dir, versions in ((c51, 2), (randk, 1)):
        run = load_run(run_dir)
        assert run.reached_budget and run.total_env_steps == 256, run_dir
        assert len(list((run_dir / "logs").glob("version_*"))) == versions
    text = (report / "report.md").read_text()
    assert "| Env | C51 | DRIML-randk |" in text and "| dodgeball | " in text
    assert "of 256 env steps" not in text  # neither run is listed as unfinished

    # wave 3: nothing left to do; the dry run says so and lists no command
    assert main([*grid, "--methods", "c51,randk", "--dry-run", "--", *_overrides(256)]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 2 finished (skipped), 0 to resume, 0 to start" in out and "task " not in out
    # a larger budget makes both unfinished again: they would be resumed, not restarted
    assert main([*grid, "--methods", "c51,randk", "--dry-run", "--", *_overrides(512)]) == 0
    out = capsys.readouterr().out
    assert "0 finished (skipped), 2 to resume, 0 to start" in out and out.count("--ckpt_path last") == 2


def test_a_task_shares_its_cores_among_the_runs_it_starts_not_the_skipped_ones(tmp_path, monkeypatch, capsys):
    """Three runs in one task on 6 cores, the first already finished: the two it starts get 3 threads each (dividing
    over all three gave 2, and left two cores idle). The fits are a stand-in interpreter that records its env."""
    from driml_pl.tools import launch

    root = tmp_path / "runs"
    assert main(["--root", str(root), "--games", "dodgeball", "--seeds", "0,1,2", "--methods", "c51", "--runs-per-gpu",
                 "3", "--gpus-per-task", "0", "--", *_overrides(256)]) == 0  # fmt: skip
    plan, spec = _plan(root)
    assert [len(t) for t in spec["tasks"]] == [3]
    seen = tmp_path / "threads"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS $CUDA_VISIBLE_DEVICES" >> {seen}\n')
    fake.chmod(0o755)
    plan.write_text(json.dumps({**spec, "python": str(fake)}))
    finished = spec["tasks"][0][0]["run_dir"]
    monkeypatch.setattr(launch.GridRun, "status", lambda run: "finished" if run.run_dir == finished else "fresh")
    monkeypatch.setattr(launch, "_forward_signals", lambda: None)  # pytest keeps its own Ctrl-C
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    capsys.readouterr()
    assert launch.run_task(str(plan), 0) == 0
    assert "c51/dodgeball/seed0: finished, skipped" in capsys.readouterr().out
    assert seen.read_text().split("\n") == ["3 ", "3 ", ""]
