"""Multi-GPU runs the same algorithm as one GPU (issue 8): global batch, envs and replay split over the ranks, InfoNCE
over the global batch, global statistics; 2 gloo CPU ranks stand in for the GPUs."""

from __future__ import annotations

import csv
import faulthandler
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, tiny_args
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from driml_pl.cli import main
from driml_pl.data import DRIMLDataModule
from driml_pl.envs import EnvConfig, make_env, rank_seeds
from driml_pl.learner import DRIML
from driml_pl.learner.objective import core_losses
from driml_pl.losses import infonce_loss

GLOBAL_BATCH = 8
DDP_ARGS = {"--trainer.accelerator": "cpu", "--trainer.devices": 2, "--trainer.strategy": "ddp",
            "--trainer.enable_progress_bar": "false"}  # fmt: skip


def test_infonce_offset_scores_anchors_against_a_wider_candidate_set():
    """Rank r's rows of the global score matrix, with its positives at ``offset = r * B``, give the global loss."""
    scores = torch.randn(3, 8, 8)
    rows = [infonce_loss(scores[:, r * 4 : (r + 1) * 4], offset=r * 4) for r in range(2)]
    torch.testing.assert_close((rows[0] + rows[1]) / 2, infonce_loss(scores))
    assert torch.allclose(infonce_loss(torch.zeros(4, 12), offset=8), torch.log(torch.tensor(12.0)))
    with pytest.raises(ValueError, match="do not fit"):
        infonce_loss(scores[:, :4], offset=5)


def test_config_values_that_do_not_split_over_the_ranks_are_refused(run_dir, capsys):
    dm = DRIMLDataModule(env=EnvConfig(num_envs=8), total_env_steps=512, replay_size=2048, batch_size=15)
    with pytest.raises(ValueError, match=r"data.batch_size=15 is not allowed: must be a multiple of the world size 2"):
        dm.check_budget(2)
    dm.check_budget(1)
    with pytest.raises(ValueError, match=r"data.env.num_envs=6 is not allowed: .* world size 4"):
        DRIMLDataModule(env=EnvConfig(num_envs=6), total_env_steps=516, replay_size=2048).check_budget(4)
    with pytest.raises(SystemExit) as err:  # through the CLI, before any rank is started
        main(tiny_args(run_dir, **DDP_ARGS, **{"--data.replay_size": 2047}))
    assert err.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("driml_pl: error: data.replay_size=2047 is not allowed: must be a multiple of the world")


# ------------------------------------------------------------------------------------- InfoNCE over 2 ranks
def _model() -> DRIML:
    torch.manual_seed(0)  # the same initial weights in every process
    return DRIML(lambda_ll=1.0, lambda_gl=0.5, lambda_gg=1.0, obs_size=(64, 64), feature_dim=64, rkhs_dim=32)


def _global_batch() -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    frames = [torch.randint(0, 256, (GLOBAL_BATCH, 1, 64, 64, 3), generator=g, dtype=torch.uint8) for _ in range(3)]
    action = torch.randint(0, 15, (GLOBAL_BATCH,), generator=g)
    returns, discount = torch.randn(GLOBAL_BATCH, generator=g), torch.full((GLOBAL_BATCH,), 0.97)
    has_future = torch.ones(GLOBAL_BATCH)
    has_future[[1, 6]] = 0.0  # two anchors with k = 0, one on each rank: the ranks' means still make the global one
    return frames[0], action, returns, discount, frames[1], frames[2], has_future


class _Losses(nn.Module):
    """`core_losses` as a module's forward, so DDP wraps it as Lightning does the DRIML module."""

    def __init__(self, model: DRIML) -> None:
        super().__init__()
        self.model = model

    def forward(self, *batch: Tensor) -> tuple[Tensor, ...]:
        out = core_losses(self.model, *batch)
        return out["loss"], out["nce_ll"], out["nce_gl"], out["nce_gg"], out["c51_loss"]


def _grads(model: DRIML) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    faulthandler.dump_traceback_later(60, exit=True)  # a hung collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model()
        model.critic.distribute(rank, world)
        ddp = DistributedDataParallel(_Losses(model))
        b = GLOBAL_BATCH // world
        losses = ddp(*(x[rank * b : (rank + 1) * b] for x in _global_batch()))
        losses[0].backward()  # DDP averages the gradients over the ranks
        mean = torch.stack([x.detach() for x in losses])
        dist.all_reduce(mean)  # each rank's loss is the mean over its anchors: the global mean is their mean
        if rank == 0:
            torch.save({"losses": mean / world, "grads": _grads(model)}, out)
        del ddp, losses  # DDP's reducer holds the process group: free it before the group goes
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_global_infonce_on_two_gloo_ranks_equals_one_rank_on_the_global_batch(tmp_path):
    """Each rank holds half the batch; with the candidates gathered across ranks, the loss (mean of the ranks'
    means) and the DDP-averaged gradients equal one rank's on the whole batch (LL, GL and GG terms)."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)

    model = _model()
    losses = _Losses(model)(*_global_batch())
    losses[0].backward()
    torch.testing.assert_close(two["losses"], torch.stack([x.detach() for x in losses]), rtol=1e-5, atol=1e-5)
    one = _grads(model)
    assert one.keys() == two["grads"].keys() and any(k.startswith("critic.candidate_heads") for k in one)
    for name, grad in one.items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- 2-rank fit through the CLI
BUDGET = 512  # global: 56 updates of 16 at ratio 2 after 64 env steps; 8 envs, 4 per rank


def _ddp_fit(run: Path, **extra: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "driml_pl", *tiny_args(run, budget=BUDGET, **DDP_ARGS, **extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _metrics(run: Path, version: int = 0) -> list[dict[str, str]]:
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _first_frames(run: Path, rank: int) -> np.ndarray:
    segments = sorted((run / "checkpoints" / "replay" / f"rank{rank}").glob("seg-*"))
    assert segments[0].name.startswith("seg-000000000000-")
    return np.load(segments[0] / "frames.npy", allow_pickle=False)[0]


@pytest.mark.slow
def test_two_rank_fit_matches_one_rank_and_resumes_exactly(tmp_path):
    """One rank and 2 gloo ranks with the same global settings make the same updates on the same number of global env
    steps; the ranks play different levels and each keeps its stream state; a 2-rank run stopped after 2 epochs (24
    updates) and resumed ends with the weights of the straight 2-rank run, with model.cuda_graphs set or not."""
    one, straight, resumed = tmp_path / "one", tmp_path / "straight", tmp_path / "resumed"
    main(tiny_args(one, budget=BUDGET, **{"--trainer.enable_progress_bar": "false"}))
    _ddp_fit(straight)
    updates = (BUDGET - 64) * 2 // 16
    assert _last(one)["global_step"] == _last(straight)["global_step"] == updates

    rows = _metrics(straight)
    env_steps = [float(r["rollout/env_steps"]) for r in rows if r.get("rollout/env_steps")]
    assert max(env_steps) == BUDGET

    # per-rank stream state; the last update was drawn right after the last env step, so the logged episode
    # statistics are those of the ranks' final states, summed (episodes) and pooled (recent means)
    units = list((straight / "checkpoints" / "units").iterdir())
    assert len(units) == 1 and {p.name for p in units[0].iterdir()} >= {"rank0", "rank1"}
    collectors = [json.loads((units[0] / f"rank{r}" / "state.json").read_text())["stream"]["collector"] for r in (0, 1)]
    assert [c["env_steps"] for c in collectors] == [BUDGET // 2] * 2
    last = rows[-1]
    episodes = [c["episodes"] for c in collectors]
    assert float(last["rollout/episodes"]) == sum(episodes) > max(episodes)
    recent = [x for c in collectors for x in c["recent_returns"]]
    assert float(last["rollout/episode_return"]) == pytest.approx(sum(recent) / len(recent), rel=1e-6)

    # each rank's envs: half the global envs, its own Procgen seed, so different levels from the first frame on
    local = EnvConfig(game="bigfish", num_envs=4, num_levels=20)
    seeds = []
    for rank in range(2):
        env = make_env(local, rank_seeds(0, rank)[0])
        np.testing.assert_array_equal(_first_frames(straight, rank), env.observe())  # this rank played these envs
        seeds.append(env.level_seeds())
        env.close()
    assert not np.array_equal(seeds[0], seeds[1]), seeds
    assert not np.array_equal(_first_frames(straight, 0), _first_frames(straight, 1))

    # the resumed run also sets model.cuda_graphs: under DDP only the acting goes through its StepGraph (on the CPU,
    # op by op), the update stays op by op, and the weights still end bitwise equal to the straight run's
    graphs = {"--model.cuda_graphs": "true"}
    _ddp_fit(resumed, **{"--trainer.max_epochs": 2}, **graphs)
    assert _last(resumed)["global_step"] == 24
    assert _last(resumed)["hyper_parameters"]["cuda_graphs"] is True
    _ddp_fit(resumed, **{"--ckpt_path": "last"}, **graphs)
    a, b = _last(straight), _last(resumed)
    assert b["global_step"] == updates
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    last_straight = [r for r in rows if r.get("train/loss")][-1]
    last_resumed = [r for r in _metrics(resumed, 1) if r.get("train/loss")][-1]
    assert last_resumed["train/loss"] == last_straight["train/loss"]
    assert last_resumed["rollout/episode_return"] == last_straight["rollout/episode_return"]
