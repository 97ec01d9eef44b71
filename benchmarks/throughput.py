"""Learner-only vs end-to-end throughput with the paper's network and batch, measured side by side in one process.

(a) learner: the DRIML module trained by a Lightning Trainer on one fixed batch (no env, no replay sampling);
(b) end to end: a real `fit` on Procgen bigfish with 32 envs at replay ratio 8 (one update per 32 env steps);
(c) pipeline efficiency = (b) / (a). Both skip their first updates (start-up, learning_starts warm-up); (a) runs
before and after (b) and is averaged.

Usage: python benchmarks/throughput.py [--updates 60] [--lambda-gg 1.0] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from driml_pl.data import DRIMLDataModule
from driml_pl.envs import EnvConfig
from driml_pl.module import DRIML
from driml_pl.types import Batch, RolloutStats

WARMUP = 5


class Timer(pl.Callback):
    """Wall time between the end of update WARMUP and the end of the last update."""

    def __init__(self) -> None:
        self.t0 = self.t1 = 0.0
        self.steps0 = self.steps1 = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        now = time.perf_counter()
        if trainer.global_step == WARMUP:
            self.t0, self.steps0 = now, trainer.global_step
        self.t1, self.steps1 = now, trainer.global_step

    def rate(self) -> float:
        return (self.steps1 - self.steps0) / (self.t1 - self.t0)


class FixedBatch(IterableDataset):
    def __init__(self, batch: Batch, updates: int) -> None:
        self.batch, self.updates = batch, updates

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.updates):
            yield self.batch


def fixed_batch(b: int) -> Batch:
    def frames() -> torch.Tensor:
        return torch.randint(0, 256, (b, 1, 64, 64, 3), dtype=torch.uint8)

    return Batch(
        frames(), torch.randint(0, 15, (b,)), torch.randn(b), torch.full((b,), 0.99**7), frames(), frames(),
        torch.ones(b, dtype=torch.long), RolloutStats(0, 0, float("nan"), float("nan"), 0.01),
    )  # fmt: skip


def trainer(device: str, timer: Timer, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device, devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip


def learner_rate(args: argparse.Namespace) -> float:
    timer = Timer()
    model = DRIML(lambda_gg=args.lambda_gg)
    loader = DataLoader(FixedBatch(fixed_batch(256), args.updates + WARMUP), batch_size=None)
    trainer(args.device, timer, args.updates + WARMUP).fit(model, loader)
    return timer.rate()


def end_to_end_rate(args: argparse.Namespace) -> float:
    timer = Timer()
    updates = args.updates + WARMUP
    data = DRIMLDataModule(
        env=EnvConfig(game="bigfish", num_envs=32),
        total_env_steps=1024 + 32 * (updates + 1),
        replay_size=100_000,
        updates_per_epoch=updates,
    )
    trainer(args.device, timer, updates).fit(DRIML(lambda_gg=args.lambda_gg), datamodule=data)
    return timer.rate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=60, help="timed updates per measurement")
    parser.add_argument("--lambda-gg", type=float, default=1.0, help="0 measures the C51 baseline")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    # learner measured before and after the end-to-end run, so warm-up and drift do not favour either side
    before = learner_rate(args)
    e2e = end_to_end_rate(args)
    after = learner_rate(args)
    learner = (before + after) / 2
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": args.device,
        "lambda_gg": args.lambda_gg,
        "learner_updates_per_s": round(learner, 3),
        "learner_before_after": [round(before, 3), round(after, 3)],
        "end_to_end_updates_per_s": round(e2e, 3),
        "end_to_end_env_steps_per_s": round(e2e * 32, 1),
        "pipeline_efficiency": round(e2e / learner, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
