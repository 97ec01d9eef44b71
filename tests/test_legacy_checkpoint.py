"""A checkpoint written by the code before the checkpoint package (commit 03335ca: the unit pointer in the data
module's state) still resumes, and exactly.

`tests/data/legacy_03335ca/checkpoints/` was written by 03335ca with the arguments below, stopped after 2 epochs
(update 24): ``tiny_args(run, budget=512, --data.replay_size 256, --trainer.max_epochs 2)``, with one torch thread
(float sums split over threads round differently, so the comparisons run with one too: ``--torch_threads 1``).
``written_on.json`` names the kind of CPU that wrote it (`support.cpu`).

Two claims, and where each holds:

- **Everywhere**: the old layout is read as today's. Its resume is bitwise equal to the resume of the same state
  with the pointer moved to today's key (``driml_unit``): both continue from the same bytes on the same CPU.
- **On the writer's kind of CPU**: the resume ends where a straight run of this code ends, bitwise. The fixture's
  first 24 updates were computed on the writer's CPU and this code's straight run computes them on this one; float
  kernels round differently on another kind (an AMD EPYC; this machine computing as an AVX2 or a plain x86-64 CPU,
  ``ATEN_CPU_CAPABILITY``), and on the plain one an action chosen differently makes the runs diverge (weights apart by
  1e-3, Adam's moments by 38% of their size after 56 updates): no tolerance would be a test there. Elsewhere the
  test is skipped, naming both kinds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_args
from support.cpu import cpu_kind

from driml_pl.cli import main

LEGACY = ROOT / "tests" / "data" / "legacy_03335ca" / "checkpoints"
WRITTEN_ON = json.loads((LEGACY.parent / "written_on.json").read_text())["cpu_kind"]
ARGS = {"--data.replay_size": "256", "--trainer.enable_progress_bar": "false", "--torch_threads": "1"}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_threads")]


def final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --torch_threads 1 set this process's threads: give the other tests theirs back


def resume(run: Path, rekey: bool = False) -> dict:
    """Resume a copy of the fixture to the end of the budget (``rekey``: its pointer moved to today's key first)."""
    shutil.copytree(LEGACY, run / "checkpoints")
    if rekey:
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        ckpt["driml_unit"] = ckpt.pop("DRIMLDataModule")
        torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    main(tiny_args(run, budget=512, **ARGS, **{"--ckpt_path": "last"}))
    return final(run)


def assert_bitwise(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == 56
    assert a["driml_unit"]["updates"] == b["driml_unit"]["updates"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):  # fmt: skip
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


@pytest.fixture(scope="module")
def legacy_resumed(tmp_path_factory) -> dict:
    threads, environ = torch.get_num_threads(), dict(os.environ)
    try:
        return resume(tmp_path_factory.mktemp("legacy") / "run")
    finally:  # --torch_threads 1 set this process's threads and exported OMP_NUM_THREADS=1: later fits get neither
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def test_a_checkpoint_written_before_the_redesign_resumes_as_the_same_state_in_todays_layout(legacy_resumed, tmp_path):
    legacy = torch.load(LEGACY / "last.ckpt", map_location="cpu", weights_only=True)
    assert "driml_unit" not in legacy and legacy["DRIMLDataModule"]["global_step"] == 24  # the old layout
    assert legacy_resumed["driml_unit"]["global_step"] == 56  # the resumed run writes the new layout
    assert_bitwise(resume(tmp_path / "rekeyed", rekey=True), legacy_resumed)


def test_on_the_writers_kind_of_cpu_it_resumes_to_the_straight_run(legacy_resumed, tmp_path):
    here = cpu_kind()
    if here != WRITTEN_ON:
        pytest.skip(f"floats are bitwise only on the fixture writer's kind of CPU ({WRITTEN_ON}); this is {here}")
    main(tiny_args(tmp_path / "straight", budget=512, **ARGS))
    assert_bitwise(final(tmp_path / "straight"), legacy_resumed)
