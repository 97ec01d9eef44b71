"""Memory and the run directory, checked before a run starts (issue 26.2): a replay bigger than the machine, a limit
the test sets itself (RLIMIT_AS), a cgroup (a stand-in tree), a GPU (a stand-in for torch.cuda.mem_get_info), runs a
grid task packs on one GPU, and a read-only run directory (a real read-only tmpfs). Each refusal is one line, exit
2, with nothing written; the sizes are checked against the replay's own allocation and the model's own parameters."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT, tiny_args
from support.mounts import tmpfs

from driml_pl import preflight
from driml_pl.data.replay import FrameReplay, replay_bytes
from driml_pl.learner import DRIML
from driml_pl.preflight import MARGIN, Free, Need, Plan, PreflightError

PER_TRANSITION = 64 * 64 * 3 + 1 + 4 + 1 + 1  # frame, action, reward, done, first: 12,295 B
GB = 1e9


def fit(run: Path, *extra: str, preexec=None) -> subprocess.CompletedProcess[str]:
    args = [*tiny_args(run, budget=256), *extra]
    return subprocess.run([sys.executable, "-m", "driml_pl", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, preexec_fn=preexec)  # fmt: skip


def mem_available() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


REFUSAL = re.compile(
    r"driml_pl: error: data\.replay_size=(?P<size>\d+) does not fit in host memory: the run needs (?P<need>[\d.]+) GB "
    r"\(replay (?P<replay>[\d.]+) GB, model and optimizer (?P<model>[\d.]+) GB, margin 1\.1 GB\), (?P<free>[\d.]+) GB "
    r"are free \((?P<source>[^)]+)\); data\.replay_size=(?P<fits>[\d,]+) would fit"
)


# ------------------------------------------------------------------------------------------------- what it holds
def test_the_replay_bytes_are_what_the_replay_allocates():
    replay = FrameReplay(4, 100, n_step=3, gamma=0.99, max_k=2)
    arrays = (replay.frames, replay.actions, replay.rewards, replay.dones, replay.firsts)
    assert replay_bytes(100, 4) == sum(a.nbytes for a in arrays) == 400 * PER_TRANSITION


def test_the_model_bytes_are_the_real_models_parameters_with_grads_and_adams_moments():
    args = {"obs_size": (64, 64), "feature_dim": 64, "rkhs_dim": 32}
    model = DRIML(**args)
    params = sum(p.numel() * 4 for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert 0 < trainable < params  # the target and the actor's copy are not trained
    assert preflight.model_bytes(DRIML, args) == params + buffers + 3 * trainable


# ---------------------------------------------------------------------------------------------- fit refuses
def test_a_replay_bigger_than_free_memory_is_refused_in_one_line_before_anything_is_written(tmp_path):
    size = 2 * mem_available() // PER_TRANSITION // 16 * 16  # twice what this machine has free
    run = tmp_path / "run"
    done = fit(run, "--data.replay_size", str(size))
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    match = REFUSAL.fullmatch(line)
    assert match, line
    assert int(match["size"]) == size and match["source"] in (
        "MemAvailable",
        "the cgroup's memory limit less its usage",
    )
    assert float(match["replay"]) == pytest.approx(size * PER_TRANSITION / GB, abs=0.051)
    assert float(match["free"]) == pytest.approx(mem_available() / GB, rel=0.1)
    fits = int(match["fits"].replace(",", ""))
    assert fits % 8 == 0 and fits * PER_TRANSITION < float(match["free"]) * GB  # a multiple of the 8 envs
    assert not run.exists() and "Traceback" not in done.stderr


def test_compile_on_a_cpu_without_a_cxx_compiler_is_refused_in_one_line(tmp_path, monkeypatch):
    """A machine without g++ (CXX names a missing one): model.compile on the CPU is refused before anything is
    written, instead of inductor's traceback in the first update; without compile the same machine runs."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    run = tmp_path / "run"
    done = fit(run, "--model.compile", "true")
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("driml_pl: error: model.compile=true is not allowed on this machine's CPU: ")
    assert f"(tried {tmp_path / 'no-such-g++'}; CXX names another)" in line and "--model.compile false" in line
    assert not run.exists()
    plain = {"trainer": {"accelerator": "cpu"}, "model": {"compile": False}}
    preflight.check_compiler(plain)  # no compile: nothing to check
    gpu = {"trainer": {"accelerator": "gpu", "devices": 1}, "model": {"compile": True}}
    preflight.check_compiler(gpu)  # inductor writes Triton kernels on a GPU: no host compiler needed


def test_a_limit_the_test_sets_rlimit_as_is_what_the_refusal_names(tmp_path):
    limit = int(min(6 * GB, mem_available() / 2))  # an address-space limit well under the free memory
    size = limit // PER_TRANSITION // 16 * 16  # a replay of about the limit: over it with the process's own space

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    run = tmp_path / "run"
    done = fit(run, "--data.replay_size", str(size), preexec=cap)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    match = REFUSAL.fullmatch(line)
    assert match, line
    assert match["source"] == "RLIMIT_AS less this process's address space"
    assert 0 < float(match["free"]) < limit / GB  # the limit less what the process had mapped by then
    assert int(match["fits"].replace(",", "")) < size
    assert not run.exists()
    # the same replay without the limit passes the check (it fits the free memory): --print_config shows it
    shown = fit(tmp_path / "other", "--data.replay_size", str(size), "--print_config")
    assert shown.returncode == 0 and f"replay_size: {size}" in shown.stdout


# --------------------------------------------------------------------------------- the arithmetic, by hand
def plan(replay_size=100_000, num_envs=16, devices=1, accelerator="cpu", replay_device="auto") -> Plan:
    settings = {"trainer": {"accelerator": accelerator, "devices": devices},
                "data": {"replay_size": replay_size, "env": {"num_envs": num_envs}, "replay_device": replay_device},
                "model": {"obs_size": [64, 64]}}  # fmt: skip
    return preflight.plan_run(settings, DRIML)


def test_what_fits_is_the_largest_replay_that_passes_the_same_check():
    p = plan()
    model = preflight.model_bytes(DRIML, {"obs_size": [64, 64]})
    assert p.needs == [Need(100_000 * PER_TRANSITION, model)]
    free = Free(50_000 * PER_TRANSITION + model + MARGIN + 1000, "a stand-in")  # room for about half the replay
    with pytest.raises(PreflightError) as err:
        preflight.check_fit(p, host=[free])
    fits = (free.bytes - model - MARGIN) // PER_TRANSITION // 16 * 16  # by hand: the 1000 B spare hold no transition
    assert fits == 50_000
    assert str(err.value).endswith(f"are free (a stand-in); data.replay_size={fits:,} would fit")
    preflight.check_fit(plan(replay_size=fits), host=[free])  # fits
    with pytest.raises(PreflightError):
        preflight.check_fit(plan(replay_size=fits + 16 * 64), host=[free])


def test_ddp_ranks_on_one_machine_need_their_shares_and_a_margin_each():
    p = plan(replay_size=100_000, num_envs=16, devices=4)
    share = replay_bytes(100_000 // 4 // 4, 4)
    assert [n.replay for n in p.needs] == [share] * 4
    needed = 4 * (share + p.needs[0].model + MARGIN)
    preflight.check_fit(p, host=[Free(needed, "x")])
    with pytest.raises(PreflightError, match=r"for its 4 processes .* are free \(x\)"):
        preflight.check_fit(p, host=[Free(needed - 1, "x")])
    # a limit of each process's own (RLIMIT_AS) holds one process's share, not the machine's
    preflight.check_fit(p, host=[Free(needed // 4, "per", per_process=True)])


def test_the_cgroup_limit_is_the_least_over_the_groups_ancestors_v2_and_v1(tmp_path):
    root = tmp_path / "cgroup"
    (root / "a" / "b").mkdir(parents=True)
    for group, limit, used in ((root / "a", 8 << 30, 5 << 30), (root / "a" / "b", "max", 1 << 30)):
        (group / "memory.max").write_text(f"{limit}\n")
        (group / "memory.current").write_text(f"{used}\n")
    me = tmp_path / "self"
    me.write_text("0::/a/b\n")
    assert preflight._cgroup_free(root, me) == 3 << 30  # a's 8 GiB less its 5 in use; b has no limit of its own
    me.write_text("0::/\n")
    assert preflight._cgroup_free(root, me) is None
    v1 = root / "memory" / "job"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    me.write_text("4:memory:/job\n3:cpu,cpuacct:/job\n")
    assert preflight._cgroup_free(root, me) == 3 << 30
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert preflight._cgroup_free(root, me) is None


# ---------------------------------------------------------------------------------------------- GPUs, stand-in
def test_a_replay_on_the_gpu_is_checked_against_that_gpus_free_memory():
    p = plan(replay_size=1_000_000, num_envs=32, devices=[0, 1], accelerator="gpu")
    assert [n.gpu for n in p.needs] == [0, 1] and all(n.replay_on_gpu for n in p.needs)
    per_gpu = p.needs[0].replay + p.needs[0].model + MARGIN
    asked: list[int] = []

    def gpu(index: int) -> Free:
        asked.append(index)
        return Free(per_gpu if index == 0 else per_gpu - 1, f"mem_get_info of GPU {index}")

    host = [Free(2 * MARGIN, "MemAvailable")]  # the replay and the model are not in host memory
    with pytest.raises(PreflightError) as err:
        preflight.check_fit(p, host=host, gpu=gpu)
    assert asked == [0, 1]
    assert str(err.value).startswith(f"data.replay_size=1000000 does not fit in the memory of GPU 1: the run needs "
                                     f"{per_gpu / GB:.1f} GB (replay 6.1 GB, ")  # fmt: skip
    # data.replay_device=cpu: the replays are in host memory, the GPUs hold the models
    on_host = plan(replay_size=1_000_000, num_envs=32, devices=[0, 1], accelerator="gpu", replay_device="cpu")
    with pytest.raises(PreflightError, match="does not fit in host memory"):
        preflight.check_fit(on_host, host=host, gpu=gpu)
    preflight.check_fit(on_host, host=[Free(2 * (MARGIN + on_host.needs[0].replay), "MemAvailable")], gpu=gpu)


@pytest.mark.slow
def test_a_grid_task_refuses_runs_that_together_do_not_fit_their_gpu_and_starts_none(tmp_path, monkeypatch, capsys):
    from driml_pl.tools import launch

    root = tmp_path / "runs"
    overrides = ["--data.replay_size", "100000", "--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    assert launch.main(["--root", str(root), "--games", "bigfish", "--seeds", "0,1,2,3", "--methods", "c51",
                        "--runs-per-gpu", "4", "--gpus-per-task", "1", "--", *overrides]) == 0  # fmt: skip
    [plan_file] = sorted(root.glob("_grid/*/plan.json"))
    spec = json.loads(plan_file.read_text())
    [task] = spec["tasks"]
    one = launch.preflight.plan_run(
        launch.preflight.merged_settings(
            launch.GridRun(**{**task[0], "overrides": tuple(task[0]["overrides"])}).command("python", False)[4:]
        ),
        DRIML,
    )
    each = one.needs[0].replay + one.needs[0].model + MARGIN
    assert one.needs[0].replay == 100_000 * PER_TRANSITION  # conf/paper: 32 envs, 100,000 transitions
    free = int(2.5 * each)
    monkeypatch.setattr(launch.preflight, "gpu_free", lambda index: Free(free, f"mem_get_info of GPU {index}"))
    monkeypatch.setattr(launch, "_forward_signals", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    capsys.readouterr()
    assert launch.run_task(str(plan_file), 0) == 2
    err = capsys.readouterr().err.strip().splitlines()
    names = ", ".join(f"c51/bigfish/seed{s}" for s in range(4))
    assert err == [f"driml_pl grid: error: 4 runs on GPU 0 ({names}) need {4 * each / GB:.1f} GB (4 x {each / GB:.1f}"
                   f" GB: replay 1.2 GB, model and optimizer {one.needs[0].model / GB:.1f} GB, margin 1.1 GB each), "
                   f"{free / GB:.1f} GB are free (mem_get_info of GPU 0); 2 would fit (--runs-per-gpu 2)"]  # fmt: skip
    assert not list(root.glob("c51/bigfish/seed*/launch.log"))  # no fit was started


# ----------------------------------------------------------------------------------- a read-only run directory
@pytest.fixture
def read_only_disk(tmp_path):
    """A real read-only filesystem: a tmpfs holding an empty ``runs/``, remounted read-only."""
    with tmpfs(tmp_path / "ro", "4m", prepare=lambda mount: (mount / "runs").mkdir(), read_only=True) as mount:
        yield mount


@pytest.mark.slow
def test_a_run_directory_on_a_read_only_filesystem_is_refused_in_one_line(read_only_disk):
    run = read_only_disk / "runs" / "bigfish"
    done = fit(run)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"driml_pl: error: trainer.default_root_dir={run} cannot be written: {read_only_disk / 'runs'} is on a "
        "read-only filesystem; give a directory on a writable one"
    ]
    assert sorted(p.name for p in read_only_disk.iterdir()) == ["runs"] and not run.exists()


def test_a_config_file_as_the_run_directory_is_refused(tmp_path):
    with pytest.raises(PreflightError, match=r"is a file, not a directory"):
        preflight.check_writable("trainer.default_root_dir", CONF / "quickstart.yaml" / "run")
    preflight.check_writable("trainer.default_root_dir", tmp_path / "new" / "run")  # a new directory: fine


def test_the_grid_reads_a_runs_settings_as_fit_would_merge_them():
    args = [
        "--config",
        str(CONF / "paper" / "protocol.yaml"),
        "--config",
        str(CONF / "paper" / "c51.yaml"),
        "--data.env.game",
        "maze",
        "--data.replay_size=5000",
        "--seed_everything",
        "2",
        "--trainer.devices",
        "2",
    ]
    settings = preflight.merged_settings(args)
    assert settings["data"]["env"]["game"] == "maze" and settings["data"]["env"]["num_envs"] == 32
    assert settings["data"]["replay_size"] == 5000 and settings["seed_everything"] == 2
    assert settings["trainer"]["devices"] == 2 and settings["model"]["feature_dim"] == 512
    assert torch.device("meta")  # the model is sized on the meta device (no memory)
