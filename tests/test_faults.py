"""Faults during a run (issue 6, parts 7 and 10): a NaN loss stops the run and leaves the last good checkpoint as it
was; under DDP a rank that dies or hangs ends the whole job, non-zero, within a bounded time.

The faults are injected through named seams of the production code (`tests/support/faults.py`); the NaN test runs both
update paths, op by op and captured (on the CPU the captured update runs op by op on its static inputs).
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_args
from support.faults import Faults, command, install

from driml_pl.cli import main
from driml_pl.learner import DRIML
from driml_pl.learner.guard import FiniteLossGuard
from driml_pl.learner.metrics import NO_FAULT, DeviceMetrics

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_device_metrics_record_the_first_non_finite_term_without_reading_back():
    metrics = DeviceMetrics()
    k = torch.ones(4, dtype=torch.long)

    def add(update: int, **values: float) -> None:
        metrics.add({key: torch.tensor(v) for key, v in values.items()}, k, update)

    def fault(m: DeviceMetrics) -> tuple[int, str] | None:
        m.flush()
        assert m.fault is not None
        return None if int(m.fault) == NO_FAULT else m.describe(int(m.fault))

    for update in range(1, 301):  # more than one buffer of rows
        add(update, c51_loss=1.0, nce_gg=2.0, q_mean=0.1, loss=float(update))
    assert fault(metrics) is None
    add(302, c51_loss=1.0, nce_gg=math.inf, q_mean=0.1, loss=math.inf)  # not consecutive; the term, not the sum
    add(303, c51_loss=math.nan, nce_gg=math.nan, q_mean=math.nan, loss=math.nan)  # a later fault does not replace it
    assert fault(metrics) == (302, "train/nce_gg=inf")
    means = metrics.read_and_reset()  # logging neither resets the record nor loses a row
    assert math.isnan(float(means["loss"])) and float(means["horizon/k_mean"]) == 1.0
    assert fault(metrics) == (302, "train/nce_gg=inf")

    only_sum = DeviceMetrics()
    only_sum.add({"c51_loss": torch.tensor(1.0), "loss": torch.tensor(-math.inf)}, k, 7)
    assert fault(only_sum) == (7, "train/loss=-inf")

    finite = DeviceMetrics()
    for update in range(1, 600):
        finite.add({"c51_loss": torch.tensor(float(update)), "loss": torch.tensor(2.0)}, k, update)
    assert float(finite.read_and_reset()["c51_loss"]) == 300.0  # the mean of 1..599, over three flushes


def tree_digest(directory: Path) -> str:
    """Every file of the checkpoint directory (the unit's per-rank state and replay segments), names and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "last.ckpt"):
        h.update(str(path.relative_to(directory)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run_to_update_24(run: Path) -> tuple[Path, Path, str, str]:
    main(tiny_args(run, budget=512, **{"--trainer.max_epochs": 2}))  # 2 epochs of 12 updates: last.ckpt at 24
    ckpt, unit = run / "checkpoints" / "last.ckpt", run / "checkpoints"
    return ckpt, unit, digest(ckpt), tree_digest(unit)


def assert_last_good_checkpoint(ckpt: Path, unit: Path, digests: tuple[str, str]) -> None:
    assert (digest(ckpt), tree_digest(unit)) == digests  # nothing of the checkpoint unit was replaced or added
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 24
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "cuda_graphs", [pytest.param("false", marks=pytest.mark.full), "true"]
)  # the captured path is the harder one
def test_nan_loss_stops_the_run_naming_update_and_term_and_keeps_the_last_checkpoint(run_dir, cuda_graphs):
    """Through the CLI in a subprocess: the resumed run meets a NaN C51 loss in update 30 (epoch 3 of 12 updates),
    in the op-by-op update and in the captured one (`model.cuda_graphs`, run op by op on its static inputs here)."""
    ckpt, unit, *digests = run_to_update_24(run_dir)
    env = dict(os.environ)
    extra = {"--ckpt_path": "last", "--model.cuda_graphs": cuda_graphs}
    cmd = command(Faults(nan_at=30), tiny_args(run_dir, budget=512, **extra))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("driml_pl: error: non-finite loss at update 30: train/c51_loss=nan"), last
    assert f"the last good checkpoint is {ckpt} (update 24)" in last
    assert_last_good_checkpoint(ckpt, unit, (digests[0], digests[1]))


def test_checkpoint_guard_runs_before_anything_is_written(run_dir, monkeypatch, capsys):
    """As on a GPU, where the per-step check is skipped off logging steps: the fault is caught only when last.ckpt is
    written (at the end of epoch 3), by the guard that runs before any file of the checkpoint unit is written."""
    ckpt, unit, *digests = run_to_update_24(run_dir)
    checks: list[bool] = []
    real_check = DRIML.check_finite

    def check_only_for_checkpoints(self: DRIML, all_ranks: bool = False) -> None:
        checks.append(all_ranks)
        if all_ranks:
            real_check(self, all_ranks)

    monkeypatch.setattr(DRIML, "check_finite", check_only_for_checkpoints)
    monkeypatch.setattr(FiniteLossGuard, "on_train_end", lambda self, trainer, module: None)
    install(Faults(nan_at=30), monkeypatch.setattr)
    with pytest.raises(SystemExit) as err:
        main(tiny_args(run_dir, budget=512, **{"--ckpt_path": "last", "--trainer.max_epochs": 3}))
    assert err.value.code == 3
    assert checks.count(True) == 1  # the only check that could raise was the checkpoint guard's
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss at update 30: train/c51_loss=nan" in last, last
    assert_last_good_checkpoint(ckpt, unit, (digests[0], digests[1]))


def ddp_fit(run: Path, timeout: float, faults: Faults) -> tuple[subprocess.CompletedProcess[str], float]:
    """A 2-rank gloo DDP fit on the CPU through the CLI (Lightning starts rank 1 as a subprocess of this one)."""
    extra = {"--trainer.accelerator": "cpu", "--trainer.devices": 2, "--trainer.strategy": "ddp",
             "--trainer.enable_progress_bar": "false", "--ddp_timeout": timeout}  # fmt: skip
    cmd = command(faults, tiny_args(run, budget=1024, **extra))
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=240)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("mode", ["raise", pytest.param("hang", marks=pytest.mark.full)])
def test_ddp_job_ends_nonzero_when_a_rank_dies_or_hangs(run_dir, mode):
    """Rank 1 fails in update 10: a RuntimeError ends the job at once (the collective on rank 0 sees the closed
    connection); a hung rank 1 ends it after --ddp_timeout (20 s here), and rank 0 kills it on the way out."""
    proc, seconds = ddp_fit(run_dir, 20, Faults(fail_at=10, fail_rank=1, fail_mode=mode))
    assert proc.returncode != 0
    assert seconds < 90, seconds
    if mode == "raise":
        assert "injected failure of rank 1 in update 10" in proc.stderr
    else:
        assert "Timed out" in proc.stderr
    assert not ranks_left(run_dir)  # no rank is left behind


def ranks_left(run: Path) -> list[int]:
    """Processes of this test's run (its directory is on their command line) still alive after 5 s; killed."""
    for _ in range(10):
        pids = [
            int(p) for p in subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
        ]
        if not pids:
            return []
        time.sleep(0.5)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids
