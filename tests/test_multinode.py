"""Two nodes (issue 18.2): two torchrun "nodes" on this machine (``--nnodes 2 --node_rank 0/1``, one gloo process
each, rendezvous on 127.0.0.1) run the tiny fit of tests/test_ddp.py.

Opt-in (`nox -s slurm`, or DRIML_MULTINODE=1): five CLI fits, about 3-4 minutes on the 2-core machine, too long for
the default session (tests/test_ddp.py keeps the 2-rank one-node case there).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_args

pytestmark = pytest.mark.skipif(
    os.environ.get("DRIML_MULTINODE") != "1", reason="opt-in: nox -s slurm (DRIML_MULTINODE=1), minutes of fits"
)
BUDGET = 512  # global: (512 - 64) x 2 / 16 = 56 updates, 8 envs in all
UPDATES = (BUDGET - 64) * 2 // 16
QUIET = {"--trainer.enable_progress_bar": "false", "--trainer.accelerator": "cpu"}
LOCAL = {**QUIET, "--trainer.devices": 2, "--trainer.strategy": "ddp"}
NODES = {**QUIET, "--trainer.devices": 1, "--trainer.num_nodes": 2, "--trainer.strategy": "ddp"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fit(run: Path, **extra: object) -> None:
    cmd = [sys.executable, "-m", "driml_pl", *tiny_args(run, budget=BUDGET, **extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two_nodes(run: Path, **extra: object) -> None:
    """The same fit started on two torchrun nodes at once, as on two machines sharing the run directory."""
    port = _port()
    procs = []
    for node in (0, 1):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                  "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m",
                  "driml_pl", *tiny_args(run, budget=BUDGET, **NODES, **extra)]  # fmt: skip
        procs.append(subprocess.Popen(launch, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _collectors(run: Path) -> list[dict]:
    [unit] = list((run / "checkpoints" / "units").iterdir())
    return [json.loads((unit / f"rank{r}" / "state.json").read_text())["stream"]["collector"] for r in (0, 1)]


def _same_weights(a: Path, b: Path) -> None:
    x, y = _last(a), _last(b)
    assert x["state_dict"].keys() == y["state_dict"].keys()
    for key, value in x["state_dict"].items():
        torch.testing.assert_close(y["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_two_torchrun_nodes_run_the_fit_of_one_rank_and_of_two_local_ranks_and_resume_exactly(tmp_path):
    one, local, nodes, resumed = (tmp_path / n for n in ("one", "local", "nodes", "resumed"))
    _fit(one, **QUIET)
    _fit(local, **LOCAL)
    _two_nodes(nodes)
    # the same number of updates of the same global batch on the same global budget, whoever starts the ranks
    assert _last(one)["global_step"] == _last(local)["global_step"] == _last(nodes)["global_step"] == UPDATES
    assert [c["env_steps"] for c in _collectors(nodes)] == [BUDGET // 2] * 2
    assert [c["env_steps"] for c in _collectors(local)] == [BUDGET // 2] * 2
    # two nodes of one process are the two ranks of one node: same seeds, same collectives, the same weights
    _same_weights(local, nodes)

    # stopped after 2 epochs (24 updates) and resumed on two nodes: bitwise the straight two-node run
    _two_nodes(resumed, **{"--trainer.max_epochs": 2})
    assert _last(resumed)["global_step"] == 24
    _two_nodes(resumed, **{"--ckpt_path": "last"})
    assert _last(resumed)["global_step"] == UPDATES
    _same_weights(nodes, resumed)
