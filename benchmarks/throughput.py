"""Learner-only vs end-to-end throughput, C51 and DRIML, measured side by side in one process; one table per run.

For each learner (C51 = every lambda 0; DRIML = lambda_GG 1, DRIML-randk k in {1, 2}):
(a) learner only: the DRIML module trained by a Lightning ``fit`` on one fixed batch already on the device (no env,
    no replay), with the real logging (CSV, every ``--log-every`` updates);
(b) end to end: a real ``fit`` on Procgen bigfish (``--num-envs`` envs, replay ratio ``--replay-ratio``, the replay on
    the learner's device), same logging;
(c) pipeline efficiency = (b) / (a);
(d) host overhead per update: a null learner (no network work, zero loss) through the same real ``fit`` loop with the
    real data path (Procgen, replay writes, sampling, gathers, acting sync) and the real logging: everything the
    host does per update that is not the learner's arithmetic; and, for reference, the same null learner on a fixed
    batch (the Lightning loop alone);
(e) end-to-end env steps per second.
(a) runs before and after (b) and is averaged; every rate skips the first ``WARMUP`` updates (start-up, compile).

Usage: python benchmarks/throughput.py [--device cpu|cuda] [--batch 256] [--obs 104 80] [--compile] [--updates 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from driml_pl.data import DRIMLDataModule
from driml_pl.envs import EnvConfig
from driml_pl.learner import DRIML
from driml_pl.learner.actor import ActorSnapshot
from driml_pl.learner.graphs import StepAdam
from driml_pl.learner.update import CapturedUpdate
from driml_pl.types import Batch, RolloutStats

WARMUP = 10


class Timer(pl.Callback):
    """Wall time between the end of update WARMUP and the end of the last update (the device drained at both)."""

    def __init__(self) -> None:
        self.t0 = self.t1 = 0.0
        self.steps0 = self.steps1 = 0

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.steps0 == 0 and trainer.global_step >= WARMUP:
            self.t0, self.steps0 = self._now(pl_module), trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t1, self.steps1 = self._now(pl_module), trainer.global_step

    def seconds_per_update(self) -> float:
        return (self.t1 - self.t0) / max(1, self.steps1 - self.steps0)


class FixedBatch(IterableDataset):
    """The same minibatch, ``per_step`` times per Lightning step (as the stream groups them)."""

    def __init__(self, batch: Batch, updates: int, per_step: int) -> None:
        self.batch, self.steps, self.per_step = batch, updates // per_step, per_step

    def __iter__(self) -> Iterator[tuple[Batch, ...]]:
        for _ in range(self.steps):
            yield (self.batch,) * self.per_step


class NullActor(ActorSnapshot):
    """Greedy action 0, after waiting for the snapshot as the real actor does."""

    def act(self, obs: Tensor) -> Tensor:
        self._wait()
        return torch.zeros(obs.shape[0], dtype=torch.int64, device=obs.device).cpu()


class NullDRIML(DRIML):
    """No network work: a zero loss on one scalar parameter, greedy action 0. What remains is the host's work."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.null = torch.nn.Parameter(torch.zeros(()))
        self.acting = NullActor(self, cuda_graphs=False)

    def core(self) -> Any:
        return self._null_losses

    def _null_losses(self, obs: Tensor, action: Tensor, *args: Tensor) -> dict[str, Tensor]:
        loss = self.null * 0.0
        return {"c51_loss": loss, "q_mean": loss.detach(), "loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.clipped = [self.null]
        if isinstance(self.runner, CapturedUpdate):
            self.runner = CapturedUpdate()
        return StepAdam([self.null], lr=1e-3)


def fixed_batch(b: int, device: str) -> Batch:
    def frames() -> Tensor:
        return torch.randint(0, 256, (b, 1, 64, 64, 3), dtype=torch.uint8, device=device)

    return Batch(
        frames(), torch.randint(0, 15, (b,), device=device), torch.randn(b, device=device),
        torch.full((b,), 0.99**7, device=device), frames(), frames(),
        torch.randint(1, 3, (b,), device=device), RolloutStats(0, 0, float("nan"), float("nan"), 0.01),
    )  # fmt: skip


def make_trainer(args: argparse.Namespace, timer: Timer, max_steps: int, log_dir: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator=args.device, devices=1, max_steps=max_steps, logger=CSVLogger(log_dir, name="bench"),
        log_every_n_steps=args.log_every, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, precision=args.precision, callbacks=[timer], limit_val_batches=0,
        benchmark=args.device == "cuda",  # cudnn autotuning for the fixed conv shapes
    )  # fmt: skip


def model(args: argparse.Namespace, lambda_gg: float, null: bool = False) -> DRIML:
    cls = NullDRIML if null else DRIML
    return cls(lambda_gg=lambda_gg, obs_size=tuple(args.obs), compile=args.compile, cuda_graphs=args.cuda_graphs)


def learner_only(args: argparse.Namespace, lambda_gg: float, log_dir: str, null: bool = False) -> float:
    timer = Timer()
    updates = args.updates + args.warmup
    loader = DataLoader(FixedBatch(fixed_batch(args.batch, args.device), updates, args.per_step), batch_size=None,
                        collate_fn=lambda b: b)  # fmt: skip
    make_trainer(args, timer, updates, log_dir).fit(model(args, lambda_gg, null), loader)
    return timer.seconds_per_update()


def end_to_end(
    args: argparse.Namespace, lambda_gg: float, log_dir: str, null: bool = False, compile_sampling: bool | None = None
) -> float:
    timer = Timer()
    updates = args.updates + args.warmup
    per_update = args.batch / args.replay_ratio  # env steps per update
    steps = args.learning_starts + per_update * (updates + 1)
    budget = int(-(-steps // args.num_envs) * args.num_envs)
    data = DRIMLDataModule(
        env=EnvConfig(game="bigfish", num_envs=args.num_envs),
        total_env_steps=budget,
        replay_size=args.replay_size,
        batch_size=args.batch,
        replay_ratio=args.replay_ratio,
        learning_starts=args.learning_starts,
        updates_per_epoch=updates,
        updates_per_batch=args.per_step,
        compile_sampling=args.compile_sampling if compile_sampling is None else compile_sampling,
    )
    make_trainer(args, timer, updates, log_dir).fit(model(args, lambda_gg, null), datamodule=data)
    return timer.seconds_per_update()


def measure(args: argparse.Namespace, name: str, lambda_gg: float, log_dir: str) -> dict[str, Any]:
    before = learner_only(args, lambda_gg, log_dir)
    e2e = end_to_end(args, lambda_gg, log_dir)
    after = learner_only(args, lambda_gg, log_dir)
    learner = (before + after) / 2
    per_update = args.batch / args.replay_ratio
    return {
        "learner": name,
        "a_learner_updates_per_s": 1 / learner,
        "a_before_after": [1 / before, 1 / after],
        "b_end_to_end_updates_per_s": 1 / e2e,
        "c_efficiency": learner / e2e,
        "e_env_steps_per_s": per_update / e2e,
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--obs", type=int, nargs=2, default=[104, 80], metavar=("H", "W"))
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--replay-ratio", type=float, default=8.0)
    parser.add_argument("--replay-size", type=int, default=100_000)
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=60, help="timed updates per measurement")
    parser.add_argument("--log-every", type=int, default=100, help="trainer.log_every_n_steps")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile", action="store_true", help="model.compile=true")
    parser.add_argument("--cuda-graphs", action="store_true", help="model.cuda_graphs=true")
    parser.add_argument("--per-step", type=int, default=1, help="data.updates_per_batch (updates per Lightning step)")
    parser.add_argument("--compile-sampling", action="store_true", help="data.compile_sampling=true")
    parser.add_argument(
        "--compare-sampling", action="store_true", help="also measure (d) with the other data.compile_sampling value"
    )
    parser.add_argument("--learners", default="c51,driml", help="comma-separated subset of c51,driml")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.updates = -(-args.updates // args.per_step) * args.per_step
    args.warmup = -(-WARMUP // args.per_step) * args.per_step
    pl.seed_everything(0, verbose=False)
    torch._dynamo.config.cache_size_limit = 64  # one compile per fresh module instance below
    log_dir = tempfile.mkdtemp(prefix="driml_bench_")
    lambdas = {"c51": 0.0, "driml": 1.0}
    rows = [measure(args, name, lambdas[name], log_dir) for name in args.learners.split(",") if name]
    null_e2e = end_to_end(args, 0.0, log_dir, null=True)
    other_e2e = None
    if args.compare_sampling:  # the same null run with the other sampling path, side by side
        other_e2e = end_to_end(args, 0.0, log_dir, null=True, compile_sampling=not args.compile_sampling)
    null_loop = learner_only(args, 0.0, log_dir, null=True)
    setting = (
        f"batch {args.batch}, input {args.obs[0]}x{args.obs[1]}, {args.num_envs} envs, replay ratio "
        f"{args.replay_ratio:g}, precision {args.precision}, compile {args.compile}, cuda_graphs {args.cuda_graphs}, "
        f"compile_sampling "
        f"{args.compile_sampling}, {args.per_step} updates per Lightning step, {args.updates} timed updates"
    )
    print(f"\n## {device_name(args.device)} (torch {torch.__version__}): {setting}\n")
    print("| learner | (a) learner updates/s | (b) end-to-end updates/s | (c) = (b)/(a) | (e) env steps/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        a0, a1 = r["a_before_after"]
        print(
            f"| {r['learner']} | {r['a_learner_updates_per_s']:.1f} ({a0:.1f} / {a1:.1f}) | "
            f"{r['b_end_to_end_updates_per_s']:.1f} | {r['c_efficiency']:.2f} | {r['e_env_steps_per_s']:,.0f} |"
        )
    print(
        f"\n(d) host overhead per update (null learner, real fit loop, real data path and logging): "
        f"{null_e2e * 1e3:.2f} ms ({args.batch / args.replay_ratio / null_e2e:,.0f} env steps/s); "
        f"of which the Lightning loop and logging alone (null learner, fixed batch): {null_loop * 1e3:.2f} ms\n"
    )
    if other_e2e is not None:
        print(
            f"(d) with data.compile_sampling={not args.compile_sampling}: {other_e2e * 1e3:.2f} ms per update "
            f"(ratio to the run above: {other_e2e / null_e2e:.2f})\n"
        )
    result = {"device": device_name(args.device), "setting": setting, "rows": rows,
              "d_host_overhead_ms": null_e2e * 1e3, "d_loop_only_ms": null_loop * 1e3,
              "d_other_sampling_ms": None if other_e2e is None else other_e2e * 1e3}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
