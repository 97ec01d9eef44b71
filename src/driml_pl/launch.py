"""`python -m driml_pl grid`: the paper's grid (methods x games x seeds) handed to an existing scheduler.

Nothing here queues or places work: SLURM (a generated ``sbatch --array`` script) or submitit does. The launcher
only decides, per run directory, what a run needs, and that decision is made again by each array task when it starts
(`run_task`), so a task that SLURM requeues after a pre-emption resumes instead of starting over:

- **finished**: the logs reach the budget (`driml_pl.report.Run.reached_budget`, the same test `report` uses to list
  unfinished runs): skipped;
- **resume**: ``checkpoints/last.ckpt`` exists: ``fit ... --ckpt_path last``;
- **fresh**: anything else (no directory, or logs without a checkpoint): ``fit ...``.

One array task holds ``--gpus-per-task x --runs-per-gpu`` runs, started as parallel processes; run i sees GPU
i // runs-per-gpu of the task's CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from driml_pl.envs import GAMES
from driml_pl.report import load_run

ROOT = Path(__file__).resolve().parents[2]
METHODS: tuple[str, ...] = ("c51", "noact", "randk", "fix", "ada")  # conf/paper/<method>.yaml
SEEDS: tuple[int, ...] = (0, 1, 2)
RESERVED = ("--config", "--data.env.game", "--seed_everything", "--trainer.default_root_dir", "--ckpt_path")
"""Flags the launcher sets for each run; refused among the pass-through overrides."""


@dataclass(frozen=True)
class GridRun:
    """One (method, game, seed) cell: its config, its run directory and the pass-through overrides."""

    method: str
    game: str
    seed: int
    config: str
    run_dir: str
    overrides: tuple[str, ...] = ()
    budget: int | None = None  # data.total_env_steps this grid asks for

    @property
    def name(self) -> str:
        return f"{self.method}/{self.game}/seed{self.seed}"

    def status(self) -> str:
        """``finished``, ``resume`` or ``fresh`` (see the module docstring)."""
        path = Path(self.run_dir)
        if any(path.glob("logs/version_*/config.yaml")):
            run = load_run(path)
            if self.budget is not None:  # judge against this grid's budget, not the one the run was started with
                run.total_env_steps = self.budget
            if run.env_steps.size and run.reached_budget:
                return "finished"
        return "resume" if (path / "checkpoints" / "last.ckpt").is_file() else "fresh"

    def command(self, python: str, resume: bool) -> list[str]:
        cmd = [python, "-m", "driml_pl", "fit", "--config", self.config, "--data.env.game", self.game,
               "--seed_everything", str(self.seed), "--trainer.default_root_dir", self.run_dir,
               *self.overrides]  # fmt: skip
        return cmd + ["--ckpt_path", "last"] if resume else cmd


def _budget(config: Path, overrides: Sequence[str]) -> int | None:
    """``data.total_env_steps`` as the runs will see it: the last override of it, else the config's value."""
    value: Any = None
    for i, arg in enumerate(overrides):
        if arg == "--data.total_env_steps" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif arg.startswith("--data.total_env_steps="):
            value = arg.split("=", 1)[1]
    if value is None:
        value = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("total_env_steps")
    return None if value is None else int(value)


def plan_grid(
    methods: Sequence[str], games: Sequence[str], seeds: Sequence[int], root: Path, conf_dir: Path,
    overrides: Sequence[str],
) -> list[GridRun]:  # fmt: skip
    """Every (method, game, seed) cell, in method-major order; run directories ``root/<method>/<game>/seed<seed>``."""
    for flag in (arg.split("=", 1)[0] for arg in overrides):
        if flag in RESERVED:
            raise ValueError(f"{flag} is set by the launcher for each run; use --methods/--games/--seeds/--root")
    runs = []
    for method in methods:
        config = (conf_dir / f"{method}.yaml").resolve()
        if not config.is_file():
            raise ValueError(f"method {method!r} has no config {config}")
        budget = _budget(config, overrides)
        for game in games:
            if game not in GAMES:
                raise ValueError(f"unknown game {game!r}; valid: {', '.join(GAMES)}")
            for seed in seeds:
                run_dir = (root / method / game / f"seed{seed}").resolve()
                runs.append(GridRun(method, game, seed, str(config), str(run_dir), tuple(overrides), budget))
    return runs


def chunk(runs: Sequence[GridRun], size: int) -> list[list[GridRun]]:
    return [list(runs[i : i + size]) for i in range(0, len(runs), size)]


# ----------------------------------------------------------------------------------------------- inside a task
def run_task(plan: str, index: int) -> int:
    """Start the runs of array task ``index`` of ``plan`` (decided again now) as parallel processes; wait for them.

    Each process gets its share of the task's GPUs (CUDA_VISIBLE_DEVICES), ``OMP_NUM_THREADS`` = its share of the CPU
    cores unless already set (its torch threads, and through them its Procgen threads: `driml_pl.threads`), and
    appends its output to ``<run_dir>/launch.log``. A run whose directory is locked by
    another process (an earlier launch still running it) is left alone. Returns the largest exit code.
    """
    spec = json.loads(Path(plan).read_text())
    runs = [GridRun(**{**r, "overrides": tuple(r["overrides"])}) for r in spec["tasks"][index]]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    cores = len(os.sched_getaffinity(0))
    procs, locks = [], []
    for i, run in enumerate(runs):
        status = run.status()
        if status == "finished":
            print(f"{run.name}: finished, skipped", flush=True)
            continue
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        lock = open(Path(run.run_dir) / ".grid.lock", "w")  # noqa: SIM115 (held until the run ends)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"{run.name}: running in another process, left alone", flush=True)
            lock.close()
            continue
        env = dict(os.environ)
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = visible[(i // spec["runs_per_gpu"]) % len(visible)]
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // len(runs))))
        cmd = run.command(spec["python"], resume=status == "resume")
        print(f"{run.name}: {status}: {shlex.join(cmd)}", flush=True)
        with open(Path(run.run_dir) / "launch.log", "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {status}: {shlex.join(cmd)}\n")
            log.flush()
            procs.append((run, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=spec["cwd"])))
        locks.append(lock)
    codes = [0]
    for run, proc in procs:
        codes.append(proc.wait())
        print(f"{run.name}: exit code {codes[-1]}", flush=True)
    for lock in locks:
        lock.close()
    return max(codes)


class GridTask:
    """What submitit runs: one array task. On a SLURM pre-emption or time-out submitit calls `checkpoint` and
    requeues the same task, which decides again and resumes its runs from ``last.ckpt``."""

    def __call__(self, plan: str, index: int) -> int:
        code = run_task(plan, index)
        if code:
            raise RuntimeError(f"array task {index} of {plan}: a run exited with code {code}; see its launch.log")
        return code

    def checkpoint(self, plan: str, index: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(GridTask(), plan, index)


# ----------------------------------------------------------------------------------------------- SLURM script
def slurm_script(plan: Path, tasks: Sequence[Sequence[GridRun]], args: argparse.Namespace) -> str:
    """An ``sbatch --array`` script: task ``$SLURM_ARRAY_TASK_ID`` runs ``grid task PLAN --index ID``.

    Pre-emption: ``--signal=B:USR1@90`` sends SIGUSR1 to this batch shell 90 s before the time limit, whose trap
    requeues the task (``--requeue`` also lets SLURM requeue it on a pre-emption); the requeued task resumes its runs
    from ``last.ckpt``. The signal goes to the shell only (``B:``): Lightning's own SLURM auto-requeue saves a
    checkpoint from inside the signal handler, mid vector-step, which this trainer refuses (see the README).
    """
    parallel = f"%{args.max_parallel}" if args.max_parallel else ""
    python = shlex.quote(args.python)
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=driml-grid",
        f"#SBATCH --array=0-{len(tasks) - 1}{parallel}",
        f"#SBATCH --gres=gpu:{args.gpus_per_task}" if args.gpus_per_task else "",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --mem={args.mem_gb}G",
        f"#SBATCH --time={args.time}",
        f"#SBATCH --partition={args.partition}" if args.partition else "",
        f"#SBATCH --output={plan.parent}/slurm-%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@90",
        *[f"#SBATCH {extra}" for extra in args.sbatch],
        "#",
        f"# {sum(map(len, tasks))} runs in {len(tasks)} tasks of up to {args.gpus_per_task or 1} GPU(s) x "
        f"{args.runs_per_gpu} run(s) per GPU. Each task decides again when it starts: finished runs are skipped, "
        "runs with checkpoints/last.ckpt get --ckpt_path last.",
    ]
    for i, task in enumerate(tasks):
        for run in task:
            lines.append(f"# task {i}: {run.name}: {shlex.join(run.command(args.python, resume=False))}")
    lines += [
        "",
        f"cd {shlex.quote(str(Path.cwd()))}",
        'trap \'echo "$(date): USR1 (time limit or pre-emption): requeue"; '
        'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"\' USR1',
        f'{python} -m driml_pl grid task {shlex.quote(str(plan))} --index "$SLURM_ARRAY_TASK_ID" &',
        "wait $!  # returns early on USR1: the trap runs, SLURM ends and requeues the task",
        "",
    ]
    return "\n".join(line for line in lines if line != "") + "\n"


# ----------------------------------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="driml_pl grid",
        description="Launch the paper's grid on SLURM (an sbatch --array script) or through submitit; skips finished "
        "runs, resumes runs with a checkpoint. Arguments after -- are passed to every `fit`.",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of conf/paper/<method>.yaml")
    p.add_argument("--games", default=",".join(GAMES), help="comma list (default: all 16)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma list (default: 0,1,2)")
    p.add_argument("--root", default="runs/paper", help="runs go to ROOT/<method>/<game>/seed<seed>")
    p.add_argument("--conf-dir", default=str(ROOT / "conf" / "paper"), help="where <method>.yaml live")
    p.add_argument("--backend", choices=("slurm", "submitit"), default="slurm")
    p.add_argument("--dry-run", action="store_true", help="print each run's decision and command; write nothing")
    p.add_argument("--submit", action="store_true", help="slurm: sbatch the script (default: write it, print how)")
    p.add_argument("--executor", choices=("auto", "local"), default="auto",
                   help="submitit: auto (SLURM if sbatch is found) or local (processes on this machine)")  # fmt: skip
    p.add_argument("--wait", action="store_true", help="submitit: wait for every task (then --report, if given)")
    p.add_argument("--report", metavar="OUT", help="report ROOT into OUT once every task ended (slurm: a job "
                   "--dependency=afterany on the array; submitit: needs --wait)")  # fmt: skip
    p.add_argument("--runs-per-gpu", type=int, default=1, help="runs sharing one GPU (see README for the memory)")
    p.add_argument("--gpus-per-task", type=int, default=1, help="GPUs per array task (0: CPU-only tasks)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=int, default=32, help="host memory per task")
    p.add_argument("--time", default="48:00:00", help="time limit per task, HH:MM:SS (requeued before it)")
    p.add_argument("--partition", default=None)
    p.add_argument("--max-parallel", type=int, default=0, help="at most this many tasks at once (0: no limit)")
    p.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH line, e.g. --sbatch=--account=x")
    p.add_argument("--python", default=sys.executable, help="the interpreter the tasks run")
    return p


def _minutes(hms: str) -> int:
    parts = [int(x) for x in hms.replace("-", ":").split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    days = parts[0] if len(parts) == 4 else 0
    h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)


def _write_plan(root: Path, tasks: Sequence[Sequence[GridRun]], args: argparse.Namespace) -> Path:
    folder = root / "_grid" / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while folder.exists():
        n += 1
        folder = folder.with_name(f"{folder.name.split('.')[0]}.{n}")
    folder.mkdir(parents=True)
    spec = {"python": args.python, "cwd": str(Path.cwd()), "runs_per_gpu": args.runs_per_gpu,
            "tasks": [[asdict(r) for r in task] for task in tasks]}  # fmt: skip
    plan = folder / "plan.json"
    plan.write_text(json.dumps(spec, indent=1))
    return plan


def _submitit(plan: Path, n_tasks: int, args: argparse.Namespace, root: Path) -> int:
    import submitit

    folder = plan.parent / "submitit"
    executor: Any = (
        submitit.LocalExecutor(folder) if args.executor == "local" else submitit.AutoExecutor(folder, cluster=None)
    )
    params: dict[str, Any] = {"timeout_min": _minutes(args.time)}
    if args.executor != "local":
        params |= {"slurm_partition": args.partition, "gpus_per_node": args.gpus_per_task, "cpus_per_task":
                   args.cpus_per_task, "mem_gb": args.mem_gb, "slurm_array_parallelism": args.max_parallel or n_tasks,
                   "slurm_signal_delay_s": 90}  # fmt: skip
        params = {k: v for k, v in params.items() if v is not None}
    else:  # submitit sets CUDA_VISIBLE_DEVICES to the first gpus_per_node GPUs ("" hides them all)
        import torch

        params["gpus_per_node"] = min(args.gpus_per_task, torch.cuda.device_count())
    executor.update_parameters(**params)
    jobs = executor.map_array(GridTask(), [str(plan)] * n_tasks, list(range(n_tasks)))
    print(f"submitted {n_tasks} tasks: {', '.join(j.job_id for j in jobs)} (logs: {folder})")
    if not args.wait:
        return 0
    failed = 0
    for job in jobs:
        try:
            job.result()
        except Exception as err:  # a failed task is reported, the others still count
            failed += 1
            print(f"task {job.job_id} failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
    if args.report:
        from driml_pl.report import main as report_main

        code = report_main([str(root), "--out", args.report])
        failed += code != 0
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m driml_pl grid [OPTIONS] [-- FIT_OVERRIDES...]`` and ``grid task PLAN --index I``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["task"]:
        task_parser = argparse.ArgumentParser(prog="driml_pl grid task", description="run one array task of a plan")
        task_parser.add_argument("plan")
        task_parser.add_argument("--index", type=int, required=True)
        targs = task_parser.parse_args(argv[1:])
        return run_task(targs.plan, targs.index)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    root = Path(args.root).resolve()
    try:
        runs = plan_grid(args.methods.split(","), args.games.split(","), [int(s) for s in args.seeds.split(",")],
                         root, Path(args.conf_dir), overrides)  # fmt: skip
        status = {run: run.status() for run in runs}
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"driml_pl grid: error: {err}", file=sys.stderr)
        return 2
    pending = [run for run in runs if status[run] != "finished"]
    counts = {s: sum(v == s for v in status.values()) for s in ("finished", "resume", "fresh")}
    print(f"{len(runs)} runs: {counts['finished']} finished (skipped), {counts['resume']} to resume, "
          f"{counts['fresh']} to start")  # fmt: skip
    tasks = chunk(pending, max(1, args.gpus_per_task) * args.runs_per_gpu)
    if args.dry_run:
        for i, task in enumerate(tasks):
            for run in task:
                print(f"task {i}: {status[run]}: {shlex.join(run.command(args.python, status[run] == 'resume'))}")
        return 0
    if not tasks:
        print("nothing to run" + (f"; report: python -m driml_pl report {root} --out {args.report}" if args.report
                                  else ""))  # fmt: skip
        if args.report:
            from driml_pl.report import main as report_main

            return report_main([str(root), "--out", args.report])
        return 0
    plan = _write_plan(root, tasks, args)
    if args.backend == "submitit":
        return _submitit(plan, len(tasks), args, root)
    script = plan.with_name("array.sbatch")
    script.write_text(slurm_script(plan, tasks, args))
    print(f"wrote {script} ({len(tasks)} array tasks)")
    if not args.submit:
        print(f"submit with: sbatch {script}")
        return 0
    job = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True)
    job_id = job.stdout.strip().split(";")[0]
    print(f"submitted array job {job_id}")
    if args.report:
        cmd = f"{shlex.quote(args.python)} -m driml_pl report {shlex.quote(str(root))} --out {shlex.quote(args.report)}"
        dep = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job_id}", "--job-name=driml-report",
                              f"--output={plan.parent}/report-%j.out", f"--wrap={cmd}"],
                             check=True, capture_output=True, text=True)  # fmt: skip
        print(f"submitted report job {dep.stdout.strip()} (after the array ends)")
    return 0
