"""Issue 19 part 6: hardware a machine lacks, and validate/test without a checkpoint: one line, exit 2, nothing written.

The GPU refusals are checked on the machine the tests run on (CI and the dev machine have no CUDA GPU; there the
tests that need one are skipped); `check_hardware`'s GPU branch is checked with the machine described explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, tiny_args

from driml_pl.checks import ConfigError, check_hardware
from driml_pl.cli import main

QUICKSTART = str(CONF / "quickstart.yaml")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Run from an empty directory (so 'nothing written' is checkable) with a bare sys.argv (as `python -m`)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["driml_pl"])


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("driml_pl: error: "), stderr
    return lines[0]


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return _one_line(captured.err)


CPU_CASES = {
    "accelerator_gpu": (
        ["--trainer.accelerator", "gpu"],
        "trainer.accelerator=gpu is not allowed: no CUDA GPU is visible here (torch.cuda.is_available() is false); "
        "usable here: auto, cpu",
    ),
    "accelerator_cuda": (
        ["--trainer.accelerator", "cuda"],
        "trainer.accelerator=cuda is not allowed: no CUDA GPU is visible here",
    ),
    "accelerator_unknown": (
        ["--trainer.accelerator", "npu"],
        "trainer.accelerator=npu is not allowed: unknown accelerator; usable here: auto, cpu",
    ),
    "replay_on_cuda_with_a_cpu_learner": (
        ["--data.replay_device", "cuda"],
        "data.replay_device=cuda is not allowed: cuda needs the learner on a CUDA GPU, but it runs on a CPU; "
        "valid here: auto, cpu",
    ),
    "replay_on_cuda_with_auto_on_a_cpu_machine": (
        ["--trainer.accelerator", "auto", "--data.replay_device", "cuda"],
        "data.replay_device=cuda is not allowed: cuda needs the learner on a CUDA GPU, but it runs on the CPU "
        "(trainer.accelerator=auto, no CUDA GPU here)",
    ),
    "cpu_devices_0": (["--trainer.devices", "0"], "trainer.devices=0 is not allowed: on the CPU, auto or a number"),
    "cpu_device_indices": (
        ["--trainer.devices", "[0, 1]"],
        "trainer.devices=[0, 1] is not allowed: on the CPU, auto or a number of processes >= 1 (device indices are "
        "for GPUs)",
    ),
}


@NO_CUDA
@pytest.mark.parametrize(("override", "message"), list(CPU_CASES.values()), ids=list(CPU_CASES))
def test_hardware_this_machine_lacks_is_refused_before_anything_is_written(tmp_path, capsys, override, message):
    """Today `--trainer.accelerator gpu` is a 35-line MisconfigurationException traceback, and
    `--data.replay_device cuda` left logs/version_0/ with an event file behind."""
    run = tmp_path / "run"
    line = _refused(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(run), *override], capsys)
    assert message in line
    assert list(tmp_path.iterdir()) == []


def test_gpu_devices_are_checked_against_the_machine():
    """The GPU branch, with the machine given: 2 CUDA GPUs."""
    gpus = ("auto", "cpu", "cuda", "gpu")
    for devices in ("auto", -1, 1, 2, [0, 1], [1], "0,1", "1"):
        check_hardware("gpu", devices, "cuda", available=gpus, cuda_count=2)  # accepted
    check_hardware("auto", 2, "cuda", available=gpus, cuda_count=2)  # auto picks the GPUs: the replay may be there
    here = "trainer.devices={} is not allowed: this machine has 2 CUDA GPU(s): auto, -1 (all), 1..2 or "
    for devices, allowed in ((4, "a list of indices"), (0, "a list of indices"), ([0, 2], "indices in 0..1"),
                             ("2,3", "indices in 0..1")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            check_hardware("cuda", devices, available=gpus, cuda_count=2)
        assert str(err.value) == here.format(devices) + allowed
    # on the CPU several devices are several DDP processes (gloo): Lightning runs them, so they are allowed
    check_hardware("cpu", 4, "cpu", available=("auto", "cpu"))
    check_hardware("auto", "3", "auto", available=("auto", "cpu"))


def _checkpointed_run(run: Path) -> Path:
    """A real tiny fit; its run directory (with checkpoints/last.ckpt)."""
    main(tiny_args(run, **{"--trainer.enable_progress_bar": "false"}))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run


@pytest.mark.parametrize("subcommand", ["validate", "test"])
@pytest.mark.parametrize("ckpt", [None, "last"])
def test_evaluation_without_a_checkpoint_is_refused(tmp_path, capsys, subcommand, ckpt):
    run = tmp_path / "run"
    args = [subcommand, "--config", QUICKSTART, "--trainer.default_root_dir", str(run)]
    line = _refused(args + (["--ckpt_path", ckpt] if ckpt else []), capsys)
    assert line == (
        f"driml_pl: error: ckpt_path={ckpt} is not allowed: {subcommand} evaluates a checkpoint and "
        f"{run}/checkpoints/last.ckpt does not exist; give --ckpt_path PATH, or the run's --trainer.default_root_dir"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_validate_without_ckpt_path_evaluates_the_runs_last_checkpoint(tmp_path, capsys):
    """Not freshly initialised weights: the run's own last.ckpt, said in one line; the scores equal those of an
    explicit --ckpt_path of the same file."""
    run = _checkpointed_run(tmp_path / "run")
    capsys.readouterr()
    last = run / "checkpoints" / "last.ckpt"
    common = ["--config", QUICKSTART, "--trainer.default_root_dir", str(run), "--data.env.num_envs", "8",
              "--data.env.num_levels", "20", "--data.eval_episodes", "2", "--data.replay_size", "2048",
              "--data.batch_size", "16", "--data.learning_starts", "64", "--data.total_env_steps", "512",
              "--model.feature_dim", "64", "--model.rkhs_dim", "32", "--trainer.enable_progress_bar", "false",
              "--data.env.game", "bigfish"]  # fmt: skip
    main(["validate", *common])
    implicit = capsys.readouterr()
    notes = [line for line in implicit.err.splitlines() if line.startswith("driml_pl:")]
    assert notes == [f"driml_pl: no --ckpt_path given: validate evaluates the run's checkpoint {last}"]
    assert str(last) in "".join(implicit.out.split())  # the table's title names the checkpoint
    main(["validate", *common, "--ckpt_path", str(last)])
    explicit = capsys.readouterr()
    assert "current weights" not in implicit.out

    def rows(out: str) -> list[str]:  # the table's two rows: training and held-out levels
        return [line for line in out.splitlines() if line.startswith("│")]

    assert len(rows(implicit.out)) == 2 and rows(implicit.out) == rows(explicit.out)
