"""The replay stream: an IterableDataset living in the main process that steps the envs and samples the replay.

Each ``next()`` yields one Lightning step's `StepBatch`: ``data.updates_per_batch`` minibatches, each drawn (with a
single index array) right after the env steps the replay ratio requires before it. The envs are stepped with the
actors' snapshot of the learner (`driml_pl.types.Actor`, refreshed once per step); the first env step of the next
``next()`` is launched before this one returns, so Procgen steps while the learner updates. The stream stops exactly
at the env-step budget.

Under DDP the config values stay global (they describe the algorithm, not the hardware): each of N ranks runs
``num_envs / N`` envs, holds ``replay_size / N`` transitions and samples ``batch_size / N`` of every update's global
batch; the budget, learning starts, epsilon schedule and replay ratio count global env steps, so one rank and N ranks
make the same updates of the same global batch on the same amount of data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from driml_pl.data.collect import Collector, EpsilonSchedule, main_process_only, refuse_worker
from driml_pl.envs import NUM_ACTIONS
from driml_pl.horizon import Horizon, continuation_probs, nhg_from_uniforms
from driml_pl.remap import visible_mask
from driml_pl.types import Actor, Batch, RolloutStats, StepBatch


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
        self.actor: Actor | None = None
        # on a GPU the whole data path (uploads, acting, sampling, gathers) runs on its own CUDA stream, so it never
        # queues behind the learner's kernels; the learner's stream waits for each batch on the device. The stream
        # has the high priority: the acting forward, whose result the host waits for, is scheduled ahead of the
        # learner's queued kernels instead of after them
        self.cuda_stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None

    def bind(self, actor: Actor) -> None:
        """Attach the actors' snapshot: it acts, is refreshed once per ``next()``, and gives DRIML-ada's
        continuation probabilities."""
        if self.horizon.adaptive and not actor.adaptive:
            raise ValueError("data.horizon.mode=adaptive needs a model with adaptive_horizon=true (the CLI links it)")
        self.actor = actor

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
        assert self.actor is not None
        c = self.collector
        if c.pending:
            c.finish()
        step = c.env.num_envs
        while self._needs_step():
            if c.env_steps + step > self.env_step_budget:
                return None
            c.step(self.actor.act, self.current_epsilon())
        batch = self._sample()
        self.updates += 1
        last = self.updates >= self.allowed_updates(self.env_step_budget)
        batch = batch._replace(stats=batch.stats._replace(last=last))
        if launch_next and self._needs_step() and c.env_steps + step <= self.env_step_budget:
            c.launch(self.actor.act, self.current_epsilon())
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
        assert self.actor is not None
        self.actor.refresh()
        c = self.collector
        if batches and not c.pending and self._needs_step() and c.env_steps + c.env.num_envs <= self.env_step_budget:
            with self._on_data_stream():
                c.launch(self.actor.act, self.current_epsilon())
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
            assert self.actor is not None
            matrix = self.actor.continuation().to(replay.device)
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

    def __reduce__(self) -> Any:
        """Never pickled: a DataLoader worker started by spawn or forkserver (Python 3.14's default on Linux) would
        pickle the live envs; it is refused with the worker's own message instead of cffi's pickling error."""
        raise RuntimeError(main_process_only(type(self).__name__))

    def __iter__(self) -> Iterator[StepBatch]:
        """One epoch: the steps up to the next multiple of ``updates_per_epoch`` updates (fewer after a resume in the
        middle of an epoch), so epochs end at the same updates whatever was interrupted."""
        refuse_worker(type(self).__name__)
        if self.actor is None:
            raise RuntimeError("ReplayStream has no actor: call bind(actor) before iterating")
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
