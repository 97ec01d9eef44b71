"""CPU threads of one run: torch's intra-op threads and Procgen's stepping threads.

A run's CPU work is the learner's torch ops (intra-op threads, OpenMP in the CPU build) and Procgen's stepping
(``num_threads`` C++ threads per vector env, stepping while the learner updates). torch's own default is one intra-op
thread per core and Procgen's is 4 threads, so two runs on one machine ask for 2 x (cores + 4) busy threads; OpenMP
threads spin while they wait, and on a full machine they spin against each other (measured in docs/threads.md).

Settings (none changes an existing key):

- ``--torch_threads N`` (CLI, top level): torch's intra-op threads. Unset: ``OMP_NUM_THREADS`` if the environment sets
  it (torch reads it itself; the grid launcher sets it per run), else the cores this process may use divided by
  ``DRIML_RUNS_PER_MACHINE`` (default 1: one run keeps today's speed).
- ``--data.env.num_threads N``: Procgen's stepping threads. Unset: the run's torch thread count, at most 4 (Procgen's
  default) and at most the number of envs.
- ``DRIML_RUNS_PER_MACHINE=N`` (environment): how many runs share this machine, for the two defaults above.
"""

from __future__ import annotations

import os

PROCGEN_MAX_THREADS = 4  # gym3/procgen's own default for ProcgenGym3Env(num_threads=...)
RUNS_VAR = "DRIML_RUNS_PER_MACHINE"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a SLURM task's cpus, a taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runs_per_machine() -> int:
    """``DRIML_RUNS_PER_MACHINE`` (an integer >= 1), else 1; raises ValueError naming the variable if it is bad."""
    value = os.environ.get(RUNS_VAR, "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{RUNS_VAR}={value} is not allowed: an integer >= 1 (the runs sharing this machine)")
    return int(value)


def default_torch_threads() -> int:
    """Intra-op threads when ``--torch_threads`` is unset: OMP_NUM_THREADS if set, else cores // runs per machine."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, available_cores() // runs_per_machine())


def set_torch_threads(setting: int | None) -> int:
    """Set torch's intra-op threads for this process (the setting, or `default_torch_threads`); returns the count.

    An explicit setting is also exported as ``OMP_NUM_THREADS``, so every DDP rank Lightning's launcher starts gets
    the same count (unset, the launcher gives each rank cores // ranks, as it always has).
    """
    threads = int(setting) if setting is not None else default_torch_threads()
    import torch  # here, not at the top: the env seam (`procgen_threads`) is imported without torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if setting is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def procgen_threads(setting: int | None, num_envs: int) -> int:
    """Procgen's stepping threads for one vector env: the setting, else min(torch threads, 4, num_envs)."""
    if setting is not None:
        return int(setting)
    import torch

    return max(1, min(torch.get_num_threads(), PROCGEN_MAX_THREADS, num_envs))
