"""The two ways `python -m driml_pl grid` hands a plan to SLURM: a generated ``sbatch --array`` script (`slurm_script`,
`submit_sbatch`) or submitit (`submit_submitit`, which runs `driml_pl.tools.launch.GridTask` per array task)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class GridRun(Protocol):
    """One cell of the grid as the schedulers read it (`driml_pl.tools.launch.GridRun`)."""

    @property
    def name(self) -> str: ...

    def command(self, python: str, resume: bool) -> list[str]: ...


def slurm_script(plan: Path, tasks: Sequence[Sequence[GridRun]], args: argparse.Namespace) -> str:
    """An ``sbatch --array`` script: task ``$SLURM_ARRAY_TASK_ID`` runs ``grid task PLAN --index ID``.

    Time limit: ``--signal=B:USR1@<requeue_before>`` (90 s by default) sends SIGUSR1 to this batch shell that long
    before ``--time`` (SLURM may send it up to a minute earlier still). Its trap sends SIGTERM to the task, which
    passes it to the fits: each writes a checkpoint unit at its next step boundary and exits (143); once they have
    exited, the shell requeues the task, which resumes its runs from ``last.ckpt``. The checkpoint is written inside
    that notice, not in SLURM's KillWait (30 s by default), which a paper-size replay (up to 12.3 GB) can outlast.
    Pre-emption, ``scontrol requeue`` and ``scancel`` send SIGTERM to every process of the job: the trap on TERM
    and the task pass it on and keep waiting, so the fits stay in the job's process tree until they exit
    (``--requeue`` lets SLURM requeue a pre-empted task). The signal goes to the shell only (``B:``): Lightning's
    own SLURM auto-requeue saves a checkpoint from inside the signal handler, mid vector-step, which this trainer
    refuses (see the README).
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
        f"#SBATCH --signal=B:USR1@{args.requeue_before}",
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
        "requeue=0",
        'trap \'echo "$(date): USR1 (time limit): checkpoint, then requeue"; requeue=1; kill -TERM "$task"\' USR1',
        'trap \'echo "$(date): TERM: passed on to the runs"; kill -TERM "$task" 2>/dev/null\' TERM',
        f'{python} -m driml_pl grid task {shlex.quote(str(plan))} --index "$SLURM_ARRAY_TASK_ID" &',
        "task=$!",
        "while true; do  # a trapped signal ends `wait` early: wait again until the task has exited",
        '  wait "$task"; code=$?',
        '  kill -0 "$task" 2>/dev/null || break',
        "done",
        'if [ "$requeue" = 1 ] && [ "$code" != 0 ]; then  # the runs were stopped, not finished',
        '  echo "$(date): runs stopped (exit code $code): requeue"',
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "fi",
        'exit "$code"',
        "",
    ]
    return "\n".join(line for line in lines if line != "") + "\n"


def submit_sbatch(plan: Path, tasks: Sequence[Sequence[GridRun]], args: argparse.Namespace, root: Path) -> int:
    """Write ``array.sbatch`` beside the plan; with ``--submit`` sbatch it, and with ``--report`` a report job that
    starts once every array task has ended (``--dependency=afterany``)."""
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


def minutes(hms: str) -> int:
    """``[D-]HH:MM:SS`` (or MM:SS, or M) as SLURM counts it: whole minutes, seconds rounded up."""
    parts = [int(x) for x in hms.replace("-", ":").split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    days = parts[0] if len(parts) == 4 else 0
    h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)


def submit_submitit(plan: Path, n_tasks: int, args: argparse.Namespace, root: Path, task: Any) -> int:
    """One submitit array of ``task`` (a `GridTask`; SLURM when sbatch is found, else ``--executor local``); with
    ``--wait`` wait for every task, then ``--report``. Its time-out signal (USR2, ``--requeue-before`` s before
    ``--time``) reaches `GridTask.checkpoint`, which stops the fits with a checkpoint before submitit requeues the
    task."""
    import submitit

    folder = plan.parent / "submitit"
    executor: Any = (
        submitit.LocalExecutor(folder) if args.executor == "local" else submitit.AutoExecutor(folder, cluster=None)
    )
    params: dict[str, Any] = {"timeout_min": minutes(args.time)}
    if args.executor != "local":
        params |= {"slurm_partition": args.partition, "gpus_per_node": args.gpus_per_task, "cpus_per_task":
                   args.cpus_per_task, "mem_gb": args.mem_gb, "slurm_array_parallelism": args.max_parallel or n_tasks,
                   "slurm_signal_delay_s": args.requeue_before}  # fmt: skip
        params = {k: v for k, v in params.items() if v is not None}
    else:  # submitit sets CUDA_VISIBLE_DEVICES to the first gpus_per_node GPUs ("" hides them all)
        import torch

        params["gpus_per_node"] = min(args.gpus_per_task, torch.cuda.device_count())
    executor.update_parameters(**params)
    jobs = executor.map_array(task, [str(plan)] * n_tasks, list(range(n_tasks)))
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
        from driml_pl.tools.report import main as report_main

        code = report_main([str(root), "--out", args.report])
        failed += code != 0
    return 1 if failed else 0
