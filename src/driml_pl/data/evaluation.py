"""Evaluation episodes: the training levels (the paper's protocol) and held-out levels, in one pass.

An evaluation *episode* is the first episode of each of ``episodes`` fresh envs (one per env, so short episodes are
not favoured). It ends when Procgen starts a new episode in that env or after ``max_steps`` vector steps, whichever
comes first. Under ``use_sequential_levels`` one episode spans level after level until the agent dies or times out,
so a strong agent may never end one: the return accumulated up to the cap counts, and the number of such *capped*
episodes is reported beside the mean (nothing is dropped, which would bias a strong agent's score down).

Evaluation never touches the training run's state: its own envs (own Procgen seeds), its own numpy generator for
the epsilon draws, no torch random numbers, and the policy is only read (no gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from driml_pl.data.collect import refuse_worker
from driml_pl.envs import EnvConfig, make_env
from driml_pl.types import GreedyPolicy

LEVEL_SETS = ("train_levels", "test_levels")


@dataclass(frozen=True)
class LevelSet:
    """One group of evaluation episodes.

    Args:
        name: ``train_levels`` or ``test_levels`` (the metric names use it).
        env: Procgen settings; ``env.num_envs`` is the number of episodes this rank plays (0: none).
        rand_seed: Procgen seed of the eval envs (fixed per run seed and rank: every evaluation sees the same levels).
        rng_seed: seed of the numpy generator that draws the epsilon exploration.
    """

    name: str
    env: EnvConfig
    rand_seed: int
    rng_seed: int


@dataclass
class EpisodeResults:
    """What one level set's episodes gave (this rank only).

    Shapes (E = episodes):
        returns: (E,) float64, the return up to the end of the episode or the step cap.
        lengths: (E,) int64, steps played.
        capped: (E,) bool, the episode hit ``max_steps`` before it ended.
        level_seeds: (E,) int64, the level each episode started on (as Procgen reports it).
        frames: (T, 64, 64, 3) uint8 of episode 0, when recorded (T <= the recording cap), else None.
    """

    returns: np.ndarray
    lengths: np.ndarray
    capped: np.ndarray
    level_seeds: np.ndarray
    frames: np.ndarray | None = None


class FrameStacker:
    """The newest ``frame_stack`` frames per env, with zeros before an episode's first frame (as the replay does)."""

    def __init__(self, frames: np.ndarray, frame_stack: int) -> None:
        n = frames.shape[0]
        self.stack = torch.zeros((n, frame_stack, *frames.shape[1:]), dtype=torch.uint8)
        self.stack[:, -1] = torch.from_numpy(frames)

    def push(self, frames: np.ndarray, firsts: np.ndarray) -> None:
        if self.stack.shape[1] > 1:
            self.stack = torch.roll(self.stack, -1, dims=1)
            self.stack[torch.from_numpy(firsts)] = 0
        self.stack[:, -1] = torch.from_numpy(frames)


def play_episodes(
    level_set: LevelSet,
    policy: GreedyPolicy,
    frame_stack: int,
    epsilon: float,
    max_steps: int,
    record_frames: int = 0,
) -> EpisodeResults:
    """Play the first episode of each env of ``level_set`` with an epsilon-greedy ``policy``.

    Args:
        level_set: envs, seeds and name.
        policy: greedy actions for uint8 frame stacks (N, S, 64, 64, 3).
        frame_stack: frames per observation, as in training.
        epsilon: probability of a uniformly random action (rlpyt's eval default 0.001).
        max_steps: step cap per episode (see the module docstring).
        record_frames: keep up to this many frames of episode 0 (0: none).
    """
    n = level_set.env.num_envs
    if n == 0:
        empty = np.zeros(0)
        return EpisodeResults(empty, empty.astype(np.int64), empty.astype(bool), empty.astype(np.int64))
    env = make_env(level_set.env, level_set.rand_seed)
    rng = np.random.default_rng(level_set.rng_seed)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    try:
        level_seeds = env.level_seeds()
        first = env.observe()
        frames = [first[0].copy()] if record_frames else []
        stacker = FrameStacker(first, frame_stack)
        for _ in range(max_steps):
            explore = rng.random(n) < epsilon
            actions = rng.integers(0, env.spec.num_actions, size=n)
            if not explore.all():
                greedy = policy(stacker.stack).cpu().numpy()
                actions = np.where(explore, actions, greedy)
            rewards, obs, firsts = env.step(actions)
            returns[active] += rewards[active]
            lengths[active] += 1
            if active[0] and not firsts[0] and len(frames) < record_frames:
                frames.append(obs[0].copy())
            active &= ~firsts
            if not active.any():
                break
            stacker.push(obs, firsts)
    finally:
        env.close()
    video = np.stack(frames) if frames else None
    return EpisodeResults(returns, lengths, active.copy(), level_seeds, video)


class EvalEpisodes(IterableDataset):
    """Yields one dict per level set (``train_levels``, then ``test_levels``) each time it is iterated.

    During ``fit`` a ``gate`` decides whether this validation run plays at all (`DRIMLDataModule` schedules it in env
    steps); when it returns False the iteration is empty and costs nothing.

    Args:
        level_sets: what to play.
        frame_stack: as in training.
        epsilon: exploration during evaluation.
        max_steps: step cap per episode.
        gate: called at the start of each iteration; returns ``(play, record_frames, env_steps)`` (env_steps: the
            training run's global env steps, -1 when unknown). None: always play, no video.
    """

    def __init__(
        self,
        level_sets: Sequence[LevelSet],
        frame_stack: int,
        epsilon: float,
        max_steps: int,
        gate: Callable[[], tuple[bool, int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.level_sets, self.frame_stack = list(level_sets), frame_stack
        self.epsilon, self.max_steps, self.gate = epsilon, max_steps, gate
        self.policy: GreedyPolicy | None = None

    def bind(self, policy: GreedyPolicy) -> None:
        self.policy = policy

    def __iter__(self) -> Iterator[dict[str, Any]]:
        refuse_worker(type(self).__name__)
        assert self.policy is not None, "bind(policy) before iterating"
        play, record, env_steps = self.gate() if self.gate is not None else (True, 0, -1)
        if not play:
            return
        for level_set in self.level_sets:
            res = play_episodes(level_set, self.policy, self.frame_stack, self.epsilon, self.max_steps, record)
            batch: dict[str, Any] = {
                "level_set": level_set.name,
                "env_steps": env_steps,
                "episode_return": torch.from_numpy(res.returns),
                "episode_length": torch.from_numpy(res.lengths),
                "capped": torch.from_numpy(res.capped),
                "level_seeds": torch.from_numpy(res.level_seeds),
            }
            if res.frames is not None:
                batch["frames"] = torch.from_numpy(res.frames)
            yield batch


def rank_share(total: int, rank: int, world: int) -> int:
    """Episodes rank ``rank`` plays when ``total`` are split over ``world`` ranks (the first ranks take the rest)."""
    return total // world + (1 if rank < total % world else 0)


class EvalSchedule:
    """When ``fit`` evaluates: at the first epoch end after every multiple of ``every`` global env steps, and once
    more when the budget is spent; with ``video_every`` K > 0 a video is recorded at the first evaluation after every
    K x ``every`` env steps and at the end.

    Lightning checks validation at every epoch end and at the budget's last update; `due` answers each check.
    """

    def __init__(self, every: int, video_every: int, video_frames: int) -> None:
        self.every, self.video_every = every, video_every
        self.record = video_frames if video_every > 0 else 0  # frames per video, 0: none
        self.marks: tuple[int, int, int] | None = None  # env steps at the last eval, last video, last final eval

    def start(self, steps: int) -> None:
        """Count from ``steps`` global env steps (the start of this fit, or the resumed run's env steps)."""
        self.marks = (steps, steps, -1)

    def due(self, steps: int, final: bool) -> tuple[bool, int, int]:
        """(play, frames to record, ``steps``) at ``steps`` global env steps; ``final`` when the budget is spent."""
        if self.every <= 0 or self.marks is None:
            return False, 0, steps
        last_eval, last_video, last_final = self.marks
        every = self.every
        due = steps // every > last_eval // every or (final and steps != last_final and steps != last_eval)
        if not due:
            return False, 0, steps
        period = every * max(1, self.video_every)
        video = self.video_every > 0 and (steps // period > last_video // period or final)
        self.marks = (steps, steps if video else last_video, steps if final else last_final)
        return True, self.record if video else 0, steps
