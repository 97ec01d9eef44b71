"""The replay stream (an IterableDataset living in the main process) and the LightningDataModule around it.

Each ``next()`` steps this rank's envs with the current online network until the replay ratio allows one more
update, then yields one `Batch` drawn with a single index array. Lightning fetches one batch ahead, so acting runs one
update ahead of ``training_step``. The stream stops exactly at the env-step budget.

Under DDP the config values stay global (they describe the algorithm, not the hardware): each of N ranks runs
``num_envs / N`` envs, holds ``replay_size / N`` transitions and samples ``batch_size / N`` of every update's global
batch; the budget, learning starts, epsilon schedule and replay ratio count global env steps, so one rank and N ranks
make the same updates of the same global batch on the same amount of data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from driml_pl.collect import Collector, EpsilonSchedule, refuse_worker
from driml_pl.envs import NUM_ACTIONS, EnvConfig, ProcgenVecEnv, rank_seeds
from driml_pl.horizon import Horizon, continuation_probs, nhg_from_uniforms
from driml_pl.remap import effective_actions, visible_mask
from driml_pl.replay import FrameReplay
from driml_pl.types import Batch, ContinuationSource, GreedyPolicy, RolloutStats, StepBatch

if TYPE_CHECKING:
    from driml_pl.checkpoint import StreamCheckpointer
    from driml_pl.evaluate import LevelSet

REPLAY_DEVICES = ("auto", "cpu", "cuda")
# issue 19 hook: StepBatch (what a Lightning step carries) now lives in driml_pl.types, imported above


class ReplayStream(IterableDataset):
    """Yields replayed batches, stepping the envs to hold the replay ratio; `__len__` is one epoch's updates.

    Overlap: after handing out batch i the stream already launches the vector step that batch i + 1 needs, so
    Procgen steps (in its own C++ threads) while Lightning runs update i. The step is finished (observed and written
    to the replay) at the next ``next()``. The order of every draw and env step is fixed, so runs stay
    deterministic; no step is left in flight across an epoch end, where checkpoints are taken.

    Args:
        collector: this rank's envs + replay.
        horizon: how the InfoNCE horizon k is drawn.
        batch_size: samples per update drawn by this rank (its share of the global batch; paper: 256 in all).
        replay_ratio: sampled transitions per env step, i.e. one update per global batch / replay_ratio global env
            steps (paper: 8, 7 updates per 224 env steps).
        learning_starts: global env steps (all ranks) before the first update.
        env_step_budget: env steps on this rank; the stream ends exactly there.
        updates_per_epoch: updates per `__iter__` (an epoch), so epoch-end hooks fire.
        epsilon: exploration schedule, read with the global env-step count.
        world_size: number of ranks (global env steps = world_size * local; global batch = world_size * batch_size).
        effective: (15,) raw -> effective action map of the game (used by the adaptive horizon).
        sample_seed: seed of the sampling generator (anchors, horizons), which lives on the replay's device.
        updates_per_batch: minibatches handed out per ``next()`` (per Lightning step), each drawn right after the
            env steps it needs; the actors act with one policy snapshot per ``next()`` (paper: 7, i.e. 7 x 32 env
            steps collected, then 7 updates).
    """

    def __init__(
        self,
        collector: Collector,
        horizon: Horizon,
        batch_size: int,
        replay_ratio: float,
        learning_starts: int,
        env_step_budget: int,
        updates_per_epoch: int,
        epsilon: EpsilonSchedule,
        world_size: int = 1,
        effective: np.ndarray | None = None,
        sample_seed: int = 0,
        updates_per_batch: int = 1,
    ) -> None:
        super().__init__()
        if updates_per_epoch % updates_per_batch:
            raise ValueError(
                f"data.updates_per_epoch={updates_per_epoch} is not allowed: it must be a multiple of "
                f"data.updates_per_batch={updates_per_batch}"
            )
        self.updates_per_batch = updates_per_batch
        self.collector, self.horizon = collector, horizon
        self.batch_size, self.replay_ratio = batch_size, replay_ratio
        self.learning_starts, self.env_step_budget = learning_starts, env_step_budget
        self.updates_per_epoch, self.epsilon, self.world_size = updates_per_epoch, epsilon, world_size
        device = collector.replay.device
        effective = effective if effective is not None else np.arange(NUM_ACTIONS)
        self.effective = torch.as_tensor(effective).to(device)
        self.visible = torch.from_numpy(visible_mask(effective)).to(device)  # the game's effective actions
        self._compiled_adaptive: Any = None  # torch.compile(_adaptive_horizon), with data.compile_sampling
        self.generator = torch.Generator(device=device).manual_seed(sample_seed)
        self.updates = 0  # minibatches handed out
        self.policy: GreedyPolicy | None = None
        self.continuation: ContinuationSource | None = None
        self.refresh: Callable[[], None] | None = None
        # on a GPU the whole data path (uploads, acting, sampling, gathers) runs on its own CUDA stream, so it never
        # queues behind the learner's kernels; the learner's stream waits for each batch on the device. The stream
        # has the high priority: the acting forward, whose result the host waits for, is scheduled ahead of the
        # learner's queued kernels instead of after them
        self.cuda_stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None

    def bind(
        self,
        policy: GreedyPolicy,
        continuation: ContinuationSource | None = None,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        """Attach the acting policy, for the adaptive horizon the source of continuation probabilities, and the
        callback that refreshes the policy's snapshot of the learner (called once per ``next()``)."""
        if self.horizon.adaptive and continuation is None:
            raise ValueError("data.horizon.mode=adaptive needs a model with adaptive_horizon=true (the CLI links it)")
        self.policy, self.continuation, self.refresh = policy, continuation, refresh

    @property
    def exhausted(self) -> bool:
        """True once the budget is spent and no further update is allowed."""
        return self.collector.env_steps >= self.env_step_budget and self.allowed_updates() <= self.updates

    def allowed_updates(self, env_steps: int | None = None) -> int:
        """Updates the replay ratio allows after ``env_steps`` (default: those taken so far) on this rank.

        Counted globally (every rank steps alike): the global env steps past ``learning_starts`` times the ratio
        over the global batch, so N ranks allow exactly the updates one rank would.
        """
        steps = self.collector.env_steps if env_steps is None else env_steps
        collected = steps * self.world_size - self.learning_starts
        global_batch = self.batch_size * self.world_size
        return max(0, math.floor(collected * self.replay_ratio / global_batch)) if collected >= 0 else 0

    def current_epsilon(self) -> float:
        return self.epsilon(self.collector.env_steps * self.world_size, self.learning_starts)

    def _needs_step(self) -> bool:
        return self.allowed_updates() <= self.updates or self.collector.replay.num_valid() == 0

    def next_batch(self, launch_next: bool = True) -> Batch | None:
        """Step the envs as the ratio requires and draw one minibatch; None once the budget is spent.

        With ``launch_next`` the vector step that the following minibatch needs is started before returning.
        """
        assert self.policy is not None
        c = self.collector
        if c.pending:
            c.finish()
        step = c.env.num_envs
        while self._needs_step():
            if c.env_steps + step > self.env_step_budget:
                return None
            c.step(self.policy, self.current_epsilon())
        batch = self._sample()
        self.updates += 1
        last = self.updates >= self.allowed_updates(self.env_step_budget)
        batch = batch._replace(stats=batch.stats._replace(last=last))
        if launch_next and self._needs_step() and c.env_steps + step <= self.env_step_budget:
            c.launch(self.policy, self.current_epsilon())
        return batch

    def _on_data_stream(self) -> contextlib.AbstractContextManager[Any]:
        stream = self.cuda_stream
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def next_batches(self) -> StepBatch:
        """Up to ``updates_per_batch`` minibatches (fewer at the end of the budget, none once it is spent).

        Every env step that feeds these minibatches acts with the policy snapshot refreshed at the end of the
        previous call. Then the snapshot is refreshed (the learner's weights now: Lightning calls this at the start
        of a training step, so after the previous step's updates) and the first env step of the next call is
        launched with it, to run while the learner updates. Whether that step is launched early or taken at the
        next call makes no difference to the data, so checkpoints can be taken between any two calls.
        """
        batches: list[Batch] = []
        stream = self.cuda_stream
        with self._on_data_stream():
            for i in range(self.updates_per_batch):
                batch = self.next_batch(launch_next=i + 1 < self.updates_per_batch)
                if batch is None:
                    break
                batches.append(batch)
        if stream is not None:  # the learner's stream waits for the gathers on the device, not the host
            learner = torch.cuda.current_stream(stream.device)
            learner.wait_stream(stream)
            for batch in batches:
                for x in batch:
                    if isinstance(x, torch.Tensor):
                        x.record_stream(learner)
        if self.refresh is not None:
            self.refresh()
        c = self.collector
        if batches and not c.pending and self._needs_step() and c.env_steps + c.env.num_envs <= self.env_step_budget:
            with self._on_data_stream():
                c.launch(self.policy, self.current_epsilon())  # type: ignore[arg-type]
        return tuple(batches)

    def settle(self) -> None:
        """Finish a launched env step (before a checkpoint): the data are the same as finishing it later."""
        if self.collector.pending:
            with self._on_data_stream():
                self.collector.finish()

    def _sample(self) -> Batch:
        replay, gen = self.collector.replay, self.generator
        env, t = replay.sample_anchors(gen, self.batch_size)
        window = valid = None
        if self.horizon.adaptive:
            assert self.continuation is not None
            matrix = self.continuation().to(replay.device)
            uniforms = torch.rand((self.batch_size, self.horizon.max_k), generator=gen, device=replay.device)
            adaptive = self._adaptive_horizon
            if replay.compile_gather:  # data.compile_sampling: fused like the gather
                if self._compiled_adaptive is None:
                    self._compiled_adaptive = torch.compile(self._adaptive_horizon, dynamic=False, fullgraph=True)
                adaptive = self._compiled_adaptive
            k, window, valid = adaptive(env, t, uniforms, matrix)
        else:
            k = self.horizon.sample(gen, self.batch_size)
        s = replay.gather(env, t, k, check=False)
        c = self.collector
        stats = RolloutStats(
            c.env_steps,
            c.episodes,
            c.mean_return(),
            c.mean_length(),
            self.current_epsilon(),
            recent=len(c.recent_returns),
        )
        return Batch(
            obs=s.obs,
            action=s.action,
            returns=s.returns,
            discount=s.discount,
            next_obs=s.next_obs,
            positive_obs=s.positive_obs,
            k=s.k,
            stats=stats,
            action_window=window,
            pair_valid=valid,
        )

    def _adaptive_horizon(
        self, env: Tensor, t: Tensor, uniforms: Tensor, matrix: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """DRIML-ada's k for anchors (env, t) from the NHG process on their effective actions, given its uniform
        draws: (k, effective action window, pair validity)."""
        raw, valid = self.collector.replay.action_window(env, t, self.horizon.max_k)
        window = self.effective[raw]
        k = nhg_from_uniforms(uniforms, continuation_probs(window, valid, matrix, self.visible))
        return k, window, valid

    def __iter__(self) -> Iterator[StepBatch]:
        """One epoch: the steps up to the next multiple of ``updates_per_epoch`` updates (fewer after a resume in the
        middle of an epoch), so epochs end at the same updates whatever was interrupted."""
        refuse_worker(type(self).__name__)
        if self.policy is None:
            raise RuntimeError("ReplayStream has no policy: call bind(policy) before iterating")
        left = self.updates_per_epoch - self.updates % self.updates_per_epoch
        for _ in range(-(-left // self.updates_per_batch)):
            batches = self.next_batches()
            if not batches:
                return
            yield batches

    def __len__(self) -> int:
        """Lightning steps per epoch (after a resume in the middle of one, Lightning counts the steps already made)."""
        return self.updates_per_epoch // self.updates_per_batch

    def state_dict(self) -> dict[str, Any]:
        """The stream's state without the replay (the checkpoint unit persists the replay incrementally)."""
        self.settle()
        return {
            "updates": self.updates,
            "learning_starts": self.learning_starts,
            "generator": self.generator.get_state().numpy(),
            "collector": self.collector.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], replay_restored: bool = True) -> None:
        """Restore from `state_dict`; without the replay, refill it first: ``learning_starts`` more env steps
        (counted in the budget) before updates go on at the same ratio, instead of a burst of catch-up updates."""
        with self._on_data_stream():
            self.collector.load_state_dict(state["collector"])
            self.generator.set_state(torch.as_tensor(state["generator"]))
            self.updates = int(state["updates"])
            self.learning_starts = int(state["learning_starts"])
            if not replay_restored:
                self.collector.restart_replay()
                self.learning_starts += max(self.learning_starts, self.collector.env.num_envs * self.world_size)


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
        self._eval_marks: tuple[int, int, int] | None = None  # env steps at the last eval, last video, last final
        self.stream: ReplayStream | None = None
        self._stream_checkpointer: StreamCheckpointer | None = None
        self._unit: str | None = None  # the checkpoint unit this run last wrote or resumed from

    # ----------------------------------------------------------------------------------------------- set-up
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _attached(self) -> pl.Trainer:
        if self.trainer is None:
            raise RuntimeError("DRIMLDataModule is not attached to a Trainer")
        return self.trainer

    def _policy(self) -> GreedyPolicy:
        policy: GreedyPolicy = self._attached().lightning_module.act  # type: ignore[assignment]
        return policy

    def _continuation(self) -> ContinuationSource | None:
        module = self._attached().lightning_module
        return module.continuation_snapshot if getattr(module, "pair_model", None) is not None else None  # type: ignore[return-value]

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
        env = ProcgenVecEnv(replace(self.env_config, num_envs=local_envs), env_seed)
        capacity = self.replay_size // world // local_envs
        replay = FrameReplay(local_envs, capacity, self.n_step, self.gamma,
                             self.horizon.max_k, self.frame_stack, self._replay_device(),
                             compile_gather=self.compile_sampling, compile_writes=self.compile_sampling)  # fmt: skip
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
        module = self._attached().lightning_module
        # the actors act with the learner's snapshot, refreshed once per Lightning step (see DRIML.sync_actor)
        self.stream.bind(module.act_actor, self._continuation(), module.sync_actor)  # type: ignore[arg-type]
        on_host = self.stream.collector.replay.device.type == "cpu"
        pin = on_host and torch.cuda.is_available()
        return DataLoader(self.stream, batch_size=None, num_workers=0, pin_memory=pin, collate_fn=_as_is)

    def val_dataloader(self) -> DataLoader:
        """Training and held-out levels in one validation pass; during ``fit`` gated by `_eval_gate`."""
        if self.stream is not None:  # fit (Lightning builds this loader at the start, after a resume's restore)
            steps = self.stream.collector.env_steps * self._rank()[1]
            self._eval_marks = (steps, steps, -1)  # the schedule counts from here
        return self._eval_loader(seed_offset=1, gate=self._eval_gate)

    def test_dataloader(self) -> DataLoader:
        """The same protocol as `val_dataloader` on other episodes (other eval seeds)."""
        return self._eval_loader(seed_offset=3, gate=self._eval_gate)

    def _eval_loader(self, seed_offset: int, gate: Callable[[], tuple[bool, int, int]]) -> DataLoader:
        from driml_pl.evaluate import EvalEpisodes

        episodes = EvalEpisodes(self._level_sets(seed_offset), self.frame_stack, self.eval_epsilon,
                                self.eval_max_steps, gate)  # fmt: skip
        episodes.bind(self._policy())
        # its own generator: DataLoader.__iter__ draws a seed, which would otherwise come from torch's global RNG
        return DataLoader(episodes, batch_size=None, num_workers=0, generator=torch.Generator().manual_seed(0))

    def _level_sets(self, seed_offset: int) -> list[LevelSet]:
        """The training levels and the held-out levels, each with fixed seeds per (run seed, rank, offset)."""
        from driml_pl.evaluate import LevelSet, rank_share

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

        Outside ``fit`` (``validate``/``test``) it always plays. During ``fit`` Lightning checks validation at every
        epoch end and at the budget's last update; evaluation is due when a multiple of ``eval_every_env_steps``
        was crossed since the last one, or when the budget is spent (once).
        """
        trainer, stream = self.trainer, self.stream
        marks = self._eval_marks
        record = self.eval_video_frames if self.eval_video_every > 0 else 0
        if trainer is None or stream is None or trainer.state.fn != TrainerFn.FITTING:
            return True, record, -1
        steps = stream.collector.env_steps * trainer.world_size
        if self.eval_every_env_steps <= 0 or marks is None:
            return False, 0, steps
        last_eval, last_video, last_final = marks
        every = self.eval_every_env_steps
        final = stream.exhausted or trainer.should_stop
        due = steps // every > last_eval // every or (final and steps != last_final and steps != last_eval)
        if not due:
            return False, 0, steps
        period = every * max(1, self.eval_video_every)
        video = self.eval_video_every > 0 and (steps // period > last_video // period or final)
        self._eval_marks = (steps, steps if video else last_video, steps if final else last_final)
        return True, record if video else 0, steps

    # ----------------------------------------------------------------------------------------- checkpoints
    def _checkpoint_meta(self, world_size: int | None = None) -> dict[str, Any]:
        """Settings a resume must share with the checkpoint (named by their config keys in errors)."""
        from driml_pl.checkpoint import checkpoint_meta

        world = self._rank()[1] if world_size is None else world_size
        return checkpoint_meta(
            self.env_config.game, self.env_config.num_envs, self.replay_size, self.frame_stack, world
        )

    def _checkpointer(self, directory: Path) -> StreamCheckpointer:
        from driml_pl.checkpoint import CheckpointConfig, StreamCheckpointer

        cfg = getattr(self._attached().checkpoint_callback, "config", None) or CheckpointConfig()
        if self._stream_checkpointer is None or self._stream_checkpointer.directory != directory:
            self._stream_checkpointer = StreamCheckpointer(directory, self._rank()[0], cfg.save_replay)
        return self._stream_checkpointer

    def write_checkpoint_half(self, directory: Path, unit: str) -> None:
        """This rank's half of the checkpoint unit (called by `RunCheckpoint` on every rank before the commit)."""
        if self.stream is None:
            return
        self._checkpointer(directory).write(self.stream, unit, self._attached().global_step, self._checkpoint_meta())
        self._unit = unit

    def prune_checkpoint_halves(self, unit: str) -> None:
        if self._stream_checkpointer is not None:
            self._stream_checkpointer.prune(unit)

    def state_dict(self) -> dict[str, Any]:
        """What goes into ``last.ckpt``: the unit whose per-rank halves this checkpoint commits."""
        if self.stream is None or self.trainer is None:
            return {}
        rank, world = self._rank()
        step = self._attached().global_step
        return {"world_size": world, "global_step": step, "updates": self.stream.updates, "unit": self._unit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from driml_pl.checkpoint import CheckpointError

        if not state or self.stream is None:  # validate/test read only the weights
            return
        rank, world = self._rank()
        if state.get("world_size") != world:
            written = state.get("world_size")
            raise CheckpointError(
                f"trainer.devices x num_nodes={world} does not fit the checkpoint, written with {written} ranks"
            )
        if not state.get("unit"):
            raise CheckpointError("the checkpoint has no stream state (written by an older driml_pl); start afresh")
        ckpt_path = self._attached().ckpt_path
        directory = Path(ckpt_path).parent if ckpt_path else self._checkpoint_dir()
        self._checkpointer(directory).read(self.stream, state["unit"], state["global_step"], self._checkpoint_meta())
        self._unit = state["unit"]

    def _checkpoint_dir(self) -> Path:
        trainer = self._attached()
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def _as_is(batch: Any) -> Any:
    """The stream yields finished batches: no collation walk over them."""
    return batch
