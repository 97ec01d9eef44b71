"""A checkpoint written by the code before the checkpoint package (commit 03335ca: the unit pointer in the data
module's state) still resumes, and exactly: it ends where a straight run of this code ends, bitwise.

`tests/data/legacy_03335ca/checkpoints/` was written by 03335ca with the arguments below, stopped after 2 epochs
(update 24): ``tiny_args(run, budget=512, --data.replay_size 256, --trainer.max_epochs 2)``, with one torch thread
(float sums split over threads round differently, so the comparison runs with one too: ``--torch_threads 1``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_args

from driml_pl.cli import main

LEGACY = ROOT / "tests" / "data" / "legacy_03335ca" / "checkpoints"
ARGS = {"--data.replay_size": "256", "--trainer.enable_progress_bar": "false", "--torch_threads": "1"}


def final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --torch_threads 1 set this process's threads: give the other tests theirs back


@pytest.mark.slow
@pytest.mark.usefixtures("keep_threads")
def test_a_checkpoint_written_before_the_redesign_resumes_to_the_straight_run(tmp_path):
    legacy = torch.load(LEGACY / "last.ckpt", map_location="cpu", weights_only=True)
    assert "driml_unit" not in legacy and legacy["DRIMLDataModule"]["global_step"] == 24  # the old layout
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(tiny_args(straight, budget=512, **ARGS))
    (resumed / "checkpoints").parent.mkdir(parents=True)
    shutil.copytree(LEGACY, resumed / "checkpoints")
    main(tiny_args(resumed, budget=512, **ARGS, **{"--ckpt_path": "last"}))
    a, b = final(straight), final(resumed)
    assert a["global_step"] == b["global_step"] == 56
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):  # fmt: skip
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert b["driml_unit"]["global_step"] == 56  # the resumed run writes the new layout
