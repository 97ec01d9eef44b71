"""The LightningDataModule: this rank's Procgen envs, frame replay and replay stream, and the evaluation loaders.

Under DDP the config values stay global (they describe the algorithm, not the hardware): each of N ranks runs
``num_envs / N`` envs, holds ``replay_size / N`` transitions and samples ``batch_size / N`` of every update's global
batch; the budget, learning starts, epsilon schedule and replay ratio count global env steps, so one rank and N ranks
make the same updates of the same global batch on the same amount of data. Checkpointing this state is the
checkpoint unit's job (`driml_pl.checkpoint`): the data code does not know the format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from driml_pl.data.collect import Collector, EpsilonSchedule
from driml_pl.data.evaluation import EvalEpisodes, EvalSchedule, LevelSet, rank_share
from driml_pl.data.replay import FrameReplay
from driml_pl.data.stream import ReplayStream
from driml_pl.envs import EnvConfig, make_env, rank_seeds
from driml_pl.horizon import Horizon
from driml_pl.remap import effective_actions
from driml_pl.types import GreedyPolicy

REPLAY_DEVICES = ("auto", "cpu", "cuda")


class DRIMLDataModule(pl.LightningDataModule):
    """Procgen envs, the frame replay and the replay stream for one rank.

    Every count is global, whatever the number of ranks N: ``env.num_envs``, ``replay_size`` and ``batch_size`` are
    split evenly over the ranks (each must be a multiple of N) and the budget, learning starts and epsilon schedule
    count the env steps of all ranks.

    Args:
        env: Procgen settings (``env.num_envs`` envs in all: each rank runs ``num_envs / N``).
        total_env_steps: env-step budget over all ranks (paper: 50M); must be a multiple of env.num_envs.
        replay_size: transitions held over all ranks (paper: 1M, about 12.3 GB of uint8 frames; N ranks hold 1M / N
            each).
        batch_size: samples per update, the global batch (paper: 256; each rank samples ``batch_size / N`` from its
            own replay).
        replay_ratio: sampled transitions per env step (paper: 8).
        learning_starts: env steps (global) before the first update (paper: 1000).
        n_step: return horizon (paper: 7).
        gamma: discount (paper: 0.99).
        frame_stack: frames per observation (1: a single RGB frame for acting and learning alike; spec §8.2).
        horizon: how the InfoNCE horizon k is drawn (paper bigfish command: random, k in {1, 2}).
        epsilon: exploration schedule (paper: 0.1 -> 0.01 over 1e5 env steps).
        updates_per_epoch: updates per Lightning epoch (epoch-end hooks and checkpoints can fire there).
        seed: run seed; Procgen's rand_seed and the sampling rng are derived from it and the rank.
        eval_episodes: episodes per level set per evaluation (one per eval env; split over ranks, at least one each).
        eval_epsilon: exploration during evaluation (rlpyt default 0.001).
        replay_device: where the replay lives and is sampled: ``auto`` (the learner's device), ``cpu`` or ``cuda``
            (the paper's 1M transitions are 12.3 GB: they fit an 80 GB GPU).
        updates_per_batch: updates per Lightning step (K). The stream hands out K minibatches at once, each drawn
            right after the env steps it needs, and the actors act with one snapshot of the learner per step: the
            paper's schedule with K = 7 (7 x 32 env steps collected, then 7 updates). Amortises Lightning's per-step
            overhead; ``updates_per_epoch`` must be a multiple of it and ``trainer.log_every_n_steps`` counts steps.
        eval_every_env_steps: during ``fit``, evaluate on the training and held-out levels at the first epoch end
            after every multiple of this many global env steps, and once more when the budget is spent (0: no
            evaluation during fit; ``validate``/``test`` still work).
        eval_test_levels: held-out levels: 0 means the full level distribution (``num_levels: 0``); N > 0 means the
            N levels right after the training range (``start_level + num_levels`` onwards).
        eval_max_steps: step cap of an evaluation episode; the return up to the cap counts and capped episodes are
            counted (``eval/*_capped``); with sequential levels a good agent's episode may not end by itself.
        eval_video_every: record episode 0 of each level set as a GIF at every N-th evaluation period during fit
            (and at the end of the budget), and in every ``validate``/``test`` (0: no videos).
        eval_video_frames: at most this many frames per video.
        compile_sampling: the replay's index work through ``torch.compile``: each minibatch's gather and horizon
            draw (the replay's ``compile_gather``: a few fused kernels instead of some forty small ops) and each
            vector step's write (``compile_writes``: one fused write instead of some twenty ops); bitwise equal to
            the eager path. Off by default: see the README's speed section for what it is measured to give.
    """

    def __init__(
        self,
        env: EnvConfig = EnvConfig(),  # noqa: B008 (a frozen-by-convention default, shown by --print_config)
        total_env_steps: int = 50_000_000,
        replay_size: int = 1_000_000,
        batch_size: int = 256,
        replay_ratio: float = 8.0,
        learning_starts: int = 1000,
        n_step: int = 7,
        gamma: float = 0.99,
        frame_stack: int = 1,
        horizon: Horizon = Horizon(),  # noqa: B008
        epsilon: EpsilonSchedule = EpsilonSchedule(),  # noqa: B008
        updates_per_epoch: int = 10_000,
        seed: int = 0,  # linked from seed_everything by the CLI
        eval_episodes: int = 16,
        eval_epsilon: float = 0.001,
        replay_device: str = "auto",
        updates_per_batch: int = 1,
        eval_every_env_steps: int = 0,
        eval_test_levels: int = 0,
        eval_max_steps: int = 27_000,
        eval_video_every: int = 0,
        eval_video_frames: int = 2_000,
        compile_sampling: bool = False,
    ) -> None:
        super().__init__()
        self.env_config, self.horizon, self.epsilon = env, horizon, epsilon
        for key, value in (("batch_size", batch_size), ("replay_ratio", replay_ratio),
                           ("updates_per_epoch", updates_per_epoch), ("total_env_steps", total_env_steps),
                           ("eval_episodes", eval_episodes)):  # fmt: skip
            if value <= 0:
                raise ValueError(f"data.{key} must be > 0, got {value}")
        if replay_device not in REPLAY_DEVICES:
            raise ValueError(f"data.replay_device={replay_device!r} is not allowed; valid: {', '.join(REPLAY_DEVICES)}")
        self.save_hyperparameters()
        self.replay_device = replay_device
        self.updates_per_batch = updates_per_batch
        self.compile_sampling = compile_sampling
        self.total_env_steps, self.replay_size = total_env_steps, replay_size
        self.batch_size, self.replay_ratio, self.learning_starts = batch_size, replay_ratio, learning_starts
        self.n_step, self.gamma, self.frame_stack = n_step, gamma, frame_stack
        self.updates_per_epoch, self.seed = updates_per_epoch, seed
        self.eval_episodes, self.eval_epsilon = eval_episodes, eval_epsilon
        self.eval_every_env_steps, self.eval_test_levels = eval_every_env_steps, eval_test_levels
        self.eval_max_steps, self.eval_video_every = eval_max_steps, eval_video_every
        self.eval_video_frames = eval_video_frames
        self.schedule = EvalSchedule(eval_every_env_steps, eval_video_every, eval_video_frames)
        self.stream: ReplayStream | None = None

    # ----------------------------------------------------------------------------------------------- set-up
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _attached(self) -> pl.Trainer:
        if self.trainer is None:
            raise RuntimeError("DRIMLDataModule is not attached to a Trainer")
        return self.trainer

    def _policy(self) -> GreedyPolicy:
        """Evaluation acts with the online network's greedy actions (the paper's protocol)."""
        policy: GreedyPolicy = self._attached().lightning_module.act  # type: ignore[assignment]
        return policy

    def check_budget(self, world_size: int) -> None:
        """The global envs, replay and batch split evenly over the ranks, and the budget is honoured exactly, so it
        must split into whole vector steps (of all ranks' envs)."""
        for key, value in (("env.num_envs", self.env_config.num_envs), ("replay_size", self.replay_size),
                           ("batch_size", self.batch_size)):  # fmt: skip
            if value % world_size:
                raise ValueError(
                    f"data.{key}={value} is not allowed: must be a multiple of the world size {world_size} "
                    f"(trainer.devices x num_nodes; it is the global value, split evenly over the ranks)"
                )
        per_step = self.env_config.num_envs
        if self.total_env_steps % per_step:
            raise ValueError(
                f"data.total_env_steps={self.total_env_steps} is not a multiple of env.num_envs = {per_step}; pick a "
                f"multiple (e.g. {self.total_env_steps // per_step * per_step or per_step})"
            )

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.stream is not None:
            return
        rank, world = self._rank()
        self.check_budget(world)
        env_seed, rng = rank_seeds(self.seed, rank)
        local_envs = self.env_config.num_envs // world  # every count of the config is global: split over the ranks
        env = make_env(replace(self.env_config, num_envs=local_envs), env_seed)
        module = self.trainer.lightning_module if self.trainer is not None else None
        built = (getattr(module, "num_actions", None), getattr(module, "frame_channels", None))
        if None not in built and built != (env.spec.num_actions, env.spec.frame_shape[2]):
            env.close()
            raise ValueError(f"data.env.backend={self.env_config.backend} has {env.spec.num_actions} actions and "
                             f"{env.spec.frame_shape} frames; the model is built for {built[0]} actions and "
                             f"{built[1]}-channel frames")  # fmt: skip
        capacity = self.replay_size // world // local_envs
        replay = FrameReplay(local_envs, capacity, self.n_step, self.gamma,
                             self.horizon.max_k, self.frame_stack, self._replay_device(),
                             compile_gather=self.compile_sampling, compile_writes=self.compile_sampling,
                             frame_shape=env.spec.frame_shape)  # fmt: skip
        self.stream = ReplayStream(
            Collector(env, replay, rng),
            self.horizon,
            self.batch_size // world,
            self.replay_ratio,
            learning_starts=self.learning_starts,
            env_step_budget=self.total_env_steps // world,
            updates_per_epoch=self.updates_per_epoch,
            updates_per_batch=self.updates_per_batch,
            epsilon=self.epsilon,
            world_size=world,
            effective=effective_actions(self.env_config.game),
            sample_seed=int(rng.integers(2**62)),
        )

    def _replay_device(self) -> torch.device:
        learner = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.replay_device == "auto":
            return learner
        if self.replay_device == "cuda" and learner.type != "cuda":
            raise ValueError(f"data.replay_device=cuda needs the learner on a GPU, but it runs on {learner}")
        return learner if self.replay_device == "cuda" else torch.device("cpu")

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.stream is not None:
            self.stream.collector.env.close()
            self.stream = None

    def train_dataloader(self) -> DataLoader:
        assert self.stream is not None, "setup('fit') builds the stream"
        # the actors act with the learner's snapshot, refreshed once per Lightning step (`ActorSnapshot`)
        self.stream.bind(self._attached().lightning_module.acting)  # type: ignore[arg-type]
        on_host = self.stream.collector.replay.device.type == "cpu"
        pin = on_host and torch.cuda.is_available()
        return DataLoader(self.stream, batch_size=None, num_workers=0, pin_memory=pin, collate_fn=_as_is)

    def val_dataloader(self) -> DataLoader:
        """Training and held-out levels in one validation pass; during ``fit`` gated by `_eval_gate`."""
        if self.stream is not None:  # fit (Lightning builds this loader at the start, after a resume's restore)
            steps = self.stream.collector.env_steps * self._rank()[1]
            self.schedule.start(steps)  # the schedule counts from here
        return self._eval_loader(seed_offset=1, gate=self._eval_gate)

    def test_dataloader(self) -> DataLoader:
        """The same protocol as `val_dataloader` on other episodes (other eval seeds)."""
        return self._eval_loader(seed_offset=3, gate=self._eval_gate)

    def _eval_loader(self, seed_offset: int, gate: Callable[[], tuple[bool, int, int]]) -> DataLoader:
        episodes = EvalEpisodes(self._level_sets(seed_offset), self.frame_stack, self.eval_epsilon,
                                self.eval_max_steps, gate)  # fmt: skip
        episodes.bind(self._policy())
        # its own generator: DataLoader.__iter__ draws a seed, which would otherwise come from torch's global RNG
        return DataLoader(episodes, batch_size=None, num_workers=0, generator=torch.Generator().manual_seed(0))

    def _level_sets(self, seed_offset: int) -> list[LevelSet]:
        """The training levels and the held-out levels, each with fixed seeds per (run seed, rank, offset)."""
        rank, world = self._rank()
        train = replace(self.env_config, num_envs=max(1, rank_share(self.eval_episodes, rank, world)))
        if self.eval_test_levels > 0:
            first = train.start_level + train.num_levels
            held_out = replace(train, start_level=first, num_levels=self.eval_test_levels)
        else:
            held_out = replace(train, start_level=0, num_levels=0)
        sets = []
        for i, (name, cfg) in enumerate((("train_levels", train), ("test_levels", held_out))):
            env_seed, rng_seed = np.random.SeedSequence([self.seed, rank, seed_offset + i]).generate_state(2)
            sets.append(LevelSet(name, cfg, int(env_seed & 0x7FFFFFFF), int(rng_seed)))
        return sets

    def _eval_gate(self) -> tuple[bool, int, int]:
        """Whether this validation run plays, how many frames to record, and the run's global env steps.

        Outside ``fit`` (``validate``/``test``) it always plays; during ``fit`` `EvalSchedule` decides."""
        trainer, stream = self.trainer, self.stream
        if trainer is None or stream is None or trainer.state.fn != TrainerFn.FITTING:
            return True, self.schedule.record, -1
        steps = stream.collector.env_steps * trainer.world_size
        return self.schedule.due(steps, final=stream.exhausted or trainer.should_stop)

    # ----------------------------------------------------------------------------------------- checkpoints
    def resume_settings(self, world_size: int | None = None) -> dict[str, Any]:
        """What a resume must share with the checkpoint it reads, under the config keys named in its errors."""
        world = self._rank()[1] if world_size is None else world_size
        return resume_settings(self.env_config.game, self.env_config.num_envs, self.replay_size, self.frame_stack,
                               world)  # fmt: skip


def resume_settings(game: str, num_envs: int, replay_size: int, frame_stack: int, world_size: int | None) -> dict:
    """Settings a resume must share with the checkpoint, under their config keys (named in errors); a None value
    (the world size before the trainer exists) is not compared."""
    return {
        "data.env.game": game,
        "data.env.num_envs": num_envs,
        "data.replay_size": replay_size,
        "data.frame_stack": frame_stack,
        "world_size": world_size,
    }


def _as_is(batch: Any) -> Any:
    """The stream yields finished batches: no collation walk over them."""
    return batch
