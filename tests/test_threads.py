"""Issue 19 part 5: a run's torch and Procgen threads: defaults, settings, and what reaches torch and Procgen."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF

from driml_pl.cli import DRIMLCLI, TRAINER_DEFAULTS, main
from driml_pl.data import DRIMLDataModule
from driml_pl.envs import EnvConfig, make_env
from driml_pl.learner import DRIML
from driml_pl.threads import available_cores, default_torch_threads, procgen_threads

QUICKSTART = str(CONF / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    """An empty working directory, no thread variables from the caller, torch's thread count restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["driml_pl"])
    for name in ("OMP_NUM_THREADS", "DRIML_RUNS_PER_MACHINE"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_torch_threads_divide_the_cores_among_the_runs(monkeypatch):
    cores = available_cores()
    assert default_torch_threads() == cores  # one run: torch's own default, today's speed
    monkeypatch.setenv("DRIML_RUNS_PER_MACHINE", "2")
    assert default_torch_threads() == max(1, cores // 2)
    monkeypatch.setenv("DRIML_RUNS_PER_MACHINE", str(cores * 4))
    assert default_torch_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the environment's setting (the grid launcher's) wins
    assert default_torch_threads() == 3


def test_procgen_threads_follow_torch_threads_capped_at_4_and_the_envs():
    torch.set_num_threads(1)
    assert [procgen_threads(None, n) for n in (1, 8)] == [1, 1]
    torch.set_num_threads(2)
    assert [procgen_threads(None, n) for n in (1, 8)] == [1, 2]
    torch.set_num_threads(6)
    assert [procgen_threads(None, n) for n in (3, 32)] == [3, 4]
    assert procgen_threads(5, 32) == 5  # a setting is taken as given


def _threads_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("num_threads", [1, 3])
def test_procgen_starts_the_threads_it_is_given(num_threads):
    """Counted in the kernel: building the vector env adds exactly num_threads threads to the process."""
    make_env(EnvConfig(game="bigfish", num_envs=4, num_threads=2), rand_seed=0).close()  # load the library
    before = _threads_of_this_process()
    env = make_env(EnvConfig(game="bigfish", num_envs=4, num_threads=num_threads), rand_seed=0)
    try:
        assert _threads_of_this_process() - before == num_threads
    finally:
        env.close()


class _Parsed(Exception):
    pass


class _ParseOnly(DRIMLCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed


def _parse(*override: str) -> None:
    with pytest.raises(_Parsed):
        args = ["fit", "--config", QUICKSTART, *override]
        _ParseOnly(DRIML, DRIMLDataModule, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0, args=args)


def test_torch_threads_setting_reaches_torch_and_the_ddp_ranks():
    _parse("--torch_threads", "1")
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"  # inherited by the ranks Lightning's launcher starts


def test_unset_torch_threads_follow_runs_per_machine(monkeypatch):
    monkeypatch.setenv("DRIML_RUNS_PER_MACHINE", str(available_cores()))
    _parse()
    assert torch.get_num_threads() == 1
    assert "OMP_NUM_THREADS" not in os.environ  # a default is not exported: Lightning's per-rank default stays


@pytest.mark.parametrize(
    ("override", "env", "message"),
    [
        (["--torch_threads", "0"], {}, "torch_threads=0 is not allowed: an integer >= 1, or null for the default"),
        (["--data.env.num_threads", "0"], {}, "data.env.num_threads=0 is not allowed: an integer >= 1, or null"),
        ([], {"DRIML_RUNS_PER_MACHINE": "two"}, "DRIML_RUNS_PER_MACHINE=two is not allowed: an integer >= 1"),
        ([], {"DRIML_RUNS_PER_MACHINE": "0"}, "DRIML_RUNS_PER_MACHINE=0 is not allowed: an integer >= 1"),
    ],
    ids=["torch_threads_0", "procgen_threads_0", "runs_not_a_number", "runs_0"],
)
def test_bad_thread_settings_are_refused_in_one_line(tmp_path, capsys, monkeypatch, override, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path / "run"), *override])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("driml_pl: error: ") and message in lines[0], lines
    assert list(Path(tmp_path).iterdir()) == []


@pytest.mark.parametrize(
    ("given", "seen"),
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "300000"}, "-")],
    ids=["default", "caller_policy_kept", "caller_spincount_kept"],
)
def test_openmp_waits_passively_unless_the_caller_chose(given, seen):
    """Set by `import driml_pl`, before torch is imported (libgomp reads it once, when torch loads it)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | given
    code = "import driml_pl, os, sys; assert 'torch' not in sys.modules; print(os.environ.get('OMP_WAIT_POLICY', '-'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == seen


def test_the_grid_launchers_omp_num_threads_sets_both_torch_and_procgen(monkeypatch):
    """`grid task` gives each of its runs OMP_NUM_THREADS = cores // runs in the task (launch.run_task); that one
    variable sets the run's torch threads and, through them, its Procgen threads."""
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _parse()
    assert torch.get_num_threads() == 1
    assert procgen_threads(None, 16) == 1
