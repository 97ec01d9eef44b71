"""Evaluation episodes for `validate` (the training levels, as the paper reports) and `test` (unseen levels)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from driml_pl.collect import epsilon_greedy, refuse_worker
from driml_pl.envs import EnvConfig, ProcgenVecEnv
from driml_pl.replay import FrameReplay
from driml_pl.types import GreedyPolicy


class EvalEpisodes(IterableDataset):
    """Plays the first episode of each of ``env.num_envs`` fresh envs and yields their returns and lengths once.

    Taking exactly one episode per env avoids the bias towards short episodes that "the first N episodes to
    finish" would have.

    Args:
        env: eval env settings (num_envs = number of episodes).
        rand_seed: Procgen seed of the eval envs.
        frame_stack: as in training.
        epsilon: exploration during evaluation.
        seed: seed of the exploration rng.
        max_steps: safety cap on steps per env (Procgen's own time limits normally end episodes first).
    """

    def __init__(
        self, env: EnvConfig, rand_seed: int, frame_stack: int, epsilon: float, seed: int, max_steps: int = 27_000
    ) -> None:
        super().__init__()
        self.env_config, self.rand_seed, self.frame_stack = env, rand_seed, frame_stack
        self.epsilon, self.seed, self.max_steps = epsilon, seed, max_steps
        self.policy: GreedyPolicy | None = None

    def bind(self, policy: GreedyPolicy) -> None:
        self.policy = policy

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        refuse_worker(type(self).__name__)
        assert self.policy is not None, "bind(policy) before iterating"
        env = ProcgenVecEnv(self.env_config, self.rand_seed)
        n = env.num_envs
        ring = FrameReplay(n, self.frame_stack + 3, n_step=1, gamma=1.0, max_k=1, frame_stack=self.frame_stack)
        rng = np.random.default_rng(self.seed)
        returns = np.zeros(n)
        lengths = np.zeros(n)
        finished = np.zeros(n, dtype=bool)
        try:
            ring.reset(env.observe())
            for _ in range(self.max_steps):
                actions = epsilon_greedy(rng, self.policy, ring, self.epsilon)
                rewards, frames, firsts = env.step(actions)
                ring.add(actions, rewards, firsts, frames)
                returns[~finished] += rewards[~finished]
                lengths[~finished] += 1
                finished |= firsts
                if finished.all():
                    break
        finally:
            env.close()
        yield {
            "episode_return": torch.from_numpy(returns[finished]),
            "episode_length": torch.from_numpy(lengths[finished]),
        }
