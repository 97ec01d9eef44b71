"""Every metric a run logs, in one place: ``train/*``, ``horizon/*``, ``rollout/*``, ``perf/*`` (on logging steps)
and ``eval/*`` / ``test/*`` (evaluation), with their DDP reductions.

``train/<term>`` are the means since the last log of the keys `driml_pl.learner.objective.driml_losses` returns
(``c51_loss``, ``nce_<term>``, ``q_mean``, ``loss``, ``pair_loss``), so a new loss term is logged without an edit here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from driml_pl.types import RolloutStats


class TrainLogs:
    """Logs one Lightning step's metrics from the module's device sums and the step's `RolloutStats`."""

    def __init__(self) -> None:
        self.perf: tuple[float, int, int] | None = None  # (time, global env steps, updates) at the last log

    def log(self, module: Any, values: dict[str, Tensor], stats: RolloutStats) -> None:
        """Means since the last log of the loss terms and of k, the continuation statistics and the rollout.

        Under DDP every value is global: the loss terms and k statistics are averaged over the ranks (each holds an
        equal share of the global batch, so this is the global batch's mean) and the episode statistics summed over
        them. These are collectives; every rank logs on the same (global) steps.
        """
        trainer: pl.Trainer = module.trainer
        sync = trainer.world_size > 1
        train = {f"train/{k}": v for k, v in values.items() if not k.startswith("horizon/")}
        module.log_dict(train, batch_size=1, sync_dist=sync)
        module.log_dict({k: v for k, v in values.items() if k.startswith("horizon/")}, batch_size=1, sync_dist=sync)
        pair = module.pair_model
        if pair is not None:
            block = pair.continuation()[pair.visible][:, pair.visible]
            module.log_dict({
                "horizon/continuation_mean": block.mean(),
                "horizon/continuation_repeat": block.diagonal().mean(),
                "horizon/continuation_max": block.max(),
            }, batch_size=1)  # fmt: skip
        env_steps = int(stats.env_steps) * trainer.world_size
        # env steps and epsilon are exact globally (every rank steps alike); episode statistics are reduced
        module.log("rollout/env_steps", float(env_steps), prog_bar=True, reduce_fx="max", batch_size=1)
        module.log("rollout/epsilon", float(stats.epsilon), batch_size=1)
        episodes, episode_return, episode_length = global_episodes(module, stats)
        module.log("rollout/episodes", episodes, batch_size=1)
        if not np.isnan(episode_return):
            module.log("rollout/episode_return", episode_return, prog_bar=True, batch_size=1)
            module.log("rollout/episode_length", episode_length, batch_size=1)
        now, updates = time.perf_counter(), trainer.global_step
        if self.perf is not None and now > self.perf[0]:
            t0, e0, u0 = self.perf
            module.log("perf/env_steps_per_s", (env_steps - e0) / (now - t0), prog_bar=True, batch_size=1)
            module.log("perf/updates_per_s", (updates - u0) / (now - t0), batch_size=1)
        self.perf = (now, env_steps, updates)


def global_episodes(module: Any, stats: RolloutStats) -> tuple[float, float, float]:
    """Finished episodes of all ranks, and the mean return and length over every rank's recent episodes (its last
    100): one all-reduce of sums and counts under DDP (a collective, on logging steps only)."""
    trainer: pl.Trainer = module.trainer
    if trainer.world_size == 1:
        return float(stats.episodes), float(stats.episode_return), float(stats.episode_length)
    n = stats.recent
    sums = [stats.episodes, stats.episode_return * n if n else 0.0, stats.episode_length * n if n else 0.0, n]
    local = torch.tensor(sums, dtype=torch.float64, device=module.device)
    episodes, ret, length, count = trainer.strategy.reduce(local, reduce_op="sum").tolist()
    if count == 0:
        return episodes, float("nan"), float("nan")
    return episodes, ret / count, length / count


def log_eval(module: Any, prefix: str, batch: dict[str, Any]) -> None:
    """``<prefix>/<level set>_{return,return_std,episodes,capped,length}`` over every rank's episodes, and
    ``<prefix>/env_steps`` (the training run's global env steps) during fit."""
    returns = gather_episodes(module, batch["episode_return"])
    lengths = gather_episodes(module, batch["episode_length"])
    capped = gather_episodes(module, batch["capped"])
    key, n = f"{prefix}/{batch['level_set']}", returns.numel()
    values = {f"{key}_episodes": float(n), f"{key}_capped": float(capped.sum())}
    if n:
        values |= {
            f"{key}_return": float(returns.mean()),
            f"{key}_return_std": float(returns.std(unbiased=False)),
            f"{key}_length": float(lengths.mean()),
        }
    if int(batch["env_steps"]) >= 0:
        values[f"{prefix}/env_steps"] = float(batch["env_steps"])
    # every rank holds the same values (computed from the gathered episodes): the mean over the ranks that
    # sync_dist takes is the value itself, and Lightning no longer warns that epoch-level values are unsynced
    module.log_dict(values, add_dataloader_idx=False, batch_size=1, sync_dist=module.trainer.world_size > 1)


def gather_episodes(module: Any, x: Tensor) -> Tensor:
    """Every rank's episodes (ranks may hold different counts), as float64 on the host."""
    x = x.double().cpu()
    if module.trainer.world_size == 1:
        return x
    device = module.device
    local = x.to(device)
    counts = torch.as_tensor(module.all_gather(torch.tensor([local.numel()], device=device))).view(-1)
    padded = torch.full((int(counts.max()),), float("nan"), dtype=torch.float64, device=device)
    padded[: local.numel()] = local
    rows = torch.as_tensor(module.all_gather(padded)).view(len(counts), -1)
    return torch.cat([rows[i, : int(c)] for i, c in enumerate(counts)]).cpu()
