"""`python -m driml_pl grid`: the paper's grid (methods x games x seeds) handed to an existing scheduler.

Nothing here queues or places work: SLURM (a generated ``sbatch --array`` script) or submitit does. The launcher
only decides, per run directory, what a run needs, and that decision is made again by each array task when it starts
(`run_task`), so a task that SLURM requeues after a pre-emption resumes instead of starting over:

- **finished**: the logs reach the budget (`driml_pl.tools.report.Run.reached_budget`, the same test `report` uses
  to list unfinished runs): skipped;
- **resume**: ``checkpoints/last.ckpt`` exists: ``fit ... --ckpt_path last``;
- **fresh**: anything else (no directory, or logs without a checkpoint): ``fit ...``.

One array task holds ``--gpus-per-task x --runs-per-gpu`` runs, started as parallel processes; run i sees GPU
i // runs-per-gpu of the task's CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from driml_pl import bundled, preflight
from driml_pl.checkpoint.resume import last_checkpoint
from driml_pl.envs import GAMES
from driml_pl.preflight import PreflightError
from driml_pl.runlock import lock_holder
from driml_pl.tools.runs import load_run
from driml_pl.tools.schedulers import minutes, submit_sbatch, submit_submitit

METHODS: tuple[str, ...] = ("c51", "noact", "randk", "fix", "ada")  # conf/paper/<method>.yaml (bundled)
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
    protocol: str | None = None  # the shared protocol the method file changes (conf/paper/protocol.yaml), if any

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
        return "resume" if last_checkpoint(path).is_file() else "fresh"

    def command(self, python: str, resume: bool) -> list[str]:
        first = ["--config", self.protocol] if self.protocol else []
        cmd = [python, "-m", "driml_pl", "fit", *first, "--config", self.config, "--data.env.game", self.game,
               "--seed_everything", str(self.seed), "--trainer.default_root_dir", self.run_dir,
               *self.overrides]  # fmt: skip
        return cmd + ["--ckpt_path", "last"] if resume else cmd


def _budget(configs: Sequence[Path], overrides: Sequence[str]) -> int | None:
    """``data.total_env_steps`` as the runs will see it: the last override of it, else the last config's value."""
    value: Any = None
    for i, arg in enumerate(overrides):
        if arg == "--data.total_env_steps" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif arg.startswith("--data.total_env_steps="):
            value = arg.split("=", 1)[1]
    if value is None:  # the configs merge left to right: the last one that sets it
        for config in configs:
            found = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("total_env_steps")
            value = found if found is not None else value
    return None if value is None else int(value)


def plan_grid(
    methods: Sequence[str], games: Sequence[str], seeds: Sequence[int], root: Path, conf_dir: Path,
    overrides: Sequence[str],
) -> list[GridRun]:  # fmt: skip
    """Every (method, game, seed) cell, in method-major order; run directories ``root/<method>/<game>/seed<seed>``."""
    for flag in (arg.split("=", 1)[0] for arg in overrides):
        if flag in RESERVED:
            raise ValueError(f"{flag} is set by the launcher for each run; use --methods/--games/--seeds/--root")
    if not conf_dir.is_dir():
        raise ValueError(f"--conf-dir {conf_dir.resolve()}: no such directory")
    runs = []
    for method in methods:
        config = (conf_dir / f"{method}.yaml").resolve()
        if not config.is_file():
            raise ValueError(f"method {method!r} has no config {config}")
        protocol = (conf_dir / "protocol.yaml").resolve()  # method files state their difference from it
        shared = [protocol] if protocol.is_file() else []
        budget = _budget([*shared, config], overrides)
        for game in games:
            if game not in GAMES:
                raise ValueError(f"unknown game {game!r}; valid: {', '.join(GAMES)}")
            for seed in seeds:
                run_dir = (root / method / game / f"seed{seed}").resolve()
                runs.append(GridRun(method, game, seed, str(config), str(run_dir), tuple(overrides), budget,
                                    str(protocol) if shared else None))  # fmt: skip
    return runs


def chunk(runs: Sequence[GridRun], size: int) -> list[list[GridRun]]:
    return [list(runs[i : i + size]) for i in range(0, len(runs), size)]


# ----------------------------------------------------------------------------------------------- inside a task
def run_task(plan: str, index: int) -> int:
    """Start the runs of array task ``index`` of ``plan`` (decided again now) as parallel processes; wait for them.

    Each process gets its share of the task's GPUs (CUDA_VISIBLE_DEVICES), ``OMP_NUM_THREADS`` = its share of the CPU
    cores unless already set (its torch threads, and through them its Procgen threads: `driml_pl.threads`), and
    appends its output to ``<run_dir>/launch.log``. A run whose directory a live fit holds (its run lock,
    `driml_pl.runlock`: an earlier launch still running it) is left alone. Returns the largest exit code.
    """
    spec = json.loads(Path(plan).read_text())
    runs = [GridRun(**{**r, "overrides": tuple(r["overrides"])}) for r in spec["tasks"][index]]
    _forward_signals()
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    cores = len(os.sched_getaffinity(0))
    starting: list[tuple[GridRun, str]] = []  # decided first, so the cores and GPUs are shared by these alone
    for run in runs:
        status = run.status()
        if status == "finished":
            print(f"{run.name}: finished, skipped", flush=True)
            continue
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        holder = lock_holder(run.run_dir)  # the fit's own run lock (driml_pl.runlock): one fit per run directory
        if holder is not None:
            print(f"{run.name}: running in another process ({holder}), left alone", flush=True)
            continue
        starting.append((run, status))
    try:  # what the runs hold together, on the host and on each GPU, before any starts (driml_pl.preflight)
        check_packed_runs([run for run, _ in starting], len(visible), spec["runs_per_gpu"])
    except PreflightError as err:
        print(f"driml_pl grid: error: {err}", file=sys.stderr, flush=True)
        return 2
    procs = []
    for i, (run, status) in enumerate(starting):
        env = dict(os.environ)
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = visible[(i // spec["runs_per_gpu"]) % len(visible)]
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // len(starting))))
        cmd = run.command(spec["python"], resume=status == "resume")
        print(f"{run.name}: {status}: {shlex.join(cmd)}", flush=True)
        with open(Path(run.run_dir) / "launch.log", "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {status}: {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=spec["cwd"],
                                    preexec_fn=_ignore_usr2)  # fmt: skip
        procs.append((run, proc))
        _CHILDREN.append(proc)
    codes = [0]
    for run, proc in procs:  # a fit that lost a race for its run's lock to another process exits 2, writing nothing
        codes.append(proc.wait())
        print(f"{run.name}: exit code {codes[-1]}", flush=True)
    return max(codes)


def check_packed_runs(runs: Sequence[GridRun], gpus: int, runs_per_gpu: int, **where: Any) -> None:
    """Refuse (`PreflightError`) the runs one task starts together when their replays, models, optimizers and
    margins do not fit together: in host memory, or on a GPU that ``runs_per_gpu`` of them share (run i gets GPU
    ``i // runs_per_gpu`` of the ``gpus`` visible, as `run_task` starts them). ``where``: `preflight.check_packed`'s
    ``host`` and ``gpu`` (what is free; measured when not given)."""
    if not runs:
        return
    from driml_pl.learner import DRIML

    plans = []
    for i, run in enumerate(runs):
        plan = preflight.plan_run(preflight.merged_settings(run.command("python", resume=False)[4:]), DRIML)
        if gpus:  # each run sees one GPU of the task's (CUDA_VISIBLE_DEVICES): its index among the task's
            index = (i // runs_per_gpu) % gpus
            plan = replace(plan, needs=[replace(n, gpu=index) if n.gpu is not None else n for n in plan.needs])
        plans.append(plan)
    preflight.check_packed(plans, [run.name for run in runs], **where)


_CHILDREN: list[subprocess.Popen[bytes]] = []
"""The fits this task started (still running or not): what a stop signal is forwarded to."""


def _ignore_usr2() -> None:
    """In each fit, before exec: ignore SIGUSR2, submitit's time-out signal, which SLURM sends to every process of
    the job step; its default action would kill the fit with no checkpoint (`GridTask.checkpoint` stops it)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def stop_children(sig: int = signal.SIGTERM, timeout: float | None = None) -> None:
    """Send ``sig`` to every running fit of this task (SIGTERM: each writes a checkpoint unit at its next step
    boundary and exits with 143) and, with a ``timeout``, wait up to that many seconds for them to exit."""
    for proc in _CHILDREN:
        if not _exited(proc):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
    deadline = time.monotonic() + (timeout or 0)
    while timeout is not None and time.monotonic() < deadline and not all(map(_exited, _CHILDREN)):
        time.sleep(0.2)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has exited, without reaping it. Not ``proc.poll()``/``proc.wait()``: this runs inside a
    signal handler that interrupted `run_task`'s ``proc.wait()``, which holds the Popen's wait lock, so they would
    report "running" until their timeout (seen under submitit: the 80 s ran out past the time limit)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _forward_signals() -> None:
    """SIGTERM/SIGINT to this task (SLURM's requeue, pre-emption, scancel, or the batch shell's time-limit trap) is
    passed on to the fits, and the task keeps waiting for them: it stays their parent, so SLURM still tracks them
    (``proctrack/linuxproc`` follows parent pids: an orphaned fit escapes the job) and SIGKILLs them after KillWait.
    Not under submitit, which owns the task's handlers."""
    if "SUBMITIT_FOLDER" in os.environ or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_children(signum))


class GridTask:
    """What submitit runs: one array task. On a SLURM pre-emption or time-out submitit calls `checkpoint` and
    requeues the same task, which decides again and resumes its runs from ``last.ckpt``."""

    def __call__(self, plan: str, index: int) -> int:
        code = run_task(plan, index)
        if code:
            raise RuntimeError(f"array task {index} of {plan}: a run exited with code {code}; see its launch.log")
        return code

    def checkpoint(self, plan: str, index: int) -> Any:
        """submitit's time-out/pre-emption hook: stop the fits with SIGTERM (each writes its checkpoint unit), wait
        for them (up to 80 s: keep `--requeue-before`, submitit's notice, above that), then hand submitit the same task
        to requeue."""
        import submitit

        stop_children(signal.SIGTERM, timeout=80)
        return submitit.helpers.DelayedSubmission(GridTask(), plan, index)


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
    p.add_argument("--conf-dir", default=None, help="where <method>.yaml live (default: the bundled conf/paper)")
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
    p.add_argument("--requeue-before", type=int, default=90, metavar="S",
                   help="slurm: stop the runs (checkpoint) and requeue S seconds before --time (SLURM may signal up "
                   "to 60 s earlier)")  # fmt: skip
    p.add_argument("--partition", default=None)
    p.add_argument("--max-parallel", type=int, default=0, help="at most this many tasks at once (0: no limit)")
    p.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH line, e.g. --sbatch=--account=x")
    p.add_argument("--python", default=sys.executable, help="the interpreter the tasks run")
    return p


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
    if not 0 < args.requeue_before < 60 * minutes(args.time):
        print(f"driml_pl grid: error: --requeue-before {args.requeue_before} is not allowed: must be > 0 and below "
              f"--time {args.time} ({60 * minutes(args.time)} s)", file=sys.stderr)  # fmt: skip
        return 2
    if args.conf_dir is None and not (bundled.conf_dir() / "paper").is_dir():
        print(f"driml_pl grid: error: no bundled conf/paper found; looked in {bundled.looked_in()}; pass --conf-dir",
              file=sys.stderr)  # fmt: skip
        return 2
    conf = Path(args.conf_dir) if args.conf_dir else bundled.conf_dir() / "paper"
    try:
        runs = plan_grid(args.methods.split(","), args.games.split(","), [int(s) for s in args.seeds.split(",")],
                         root, conf, overrides)  # fmt: skip
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
            from driml_pl.tools.report import main as report_main

            return report_main([str(root), "--out", args.report])
        return 0
    plan = _write_plan(root, tasks, args)
    if args.backend == "submitit":
        return submit_submitit(plan, len(tasks), args, root, GridTask())
    return submit_sbatch(plan, tasks, args, root)
