"""Steps the envs with an epsilon-greedy policy, writes the replay, and keeps episode statistics."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import get_worker_info

from driml_pl.data.replay import FrameReplay
from driml_pl.envs import NUM_ACTIONS
from driml_pl.types import GreedyPolicy, VecEnv


@dataclass
class EpsilonSchedule:
    """Linear epsilon decay (spec §3: 0.1 -> 0.01 over 1e5 env steps once learning starts).

    Before ``learning_starts`` env steps the actors act uniformly at random (the replay warm-up).

    Args:
        start: epsilon when learning starts.
        end: final epsilon.
        decay_steps: env steps (global, all ranks) over which epsilon goes from start to end.
    """

    start: float = 0.1
    end: float = 0.01
    decay_steps: int = 100_000

    def __call__(self, env_steps: int, learning_starts: int) -> float:
        if env_steps < learning_starts:
            return 1.0
        frac = min(1.0, (env_steps - learning_starts) / max(1, self.decay_steps))
        return self.start + frac * (self.end - self.start)


def main_process_only(name: str) -> str:
    return f"{name} must run in the main process (it steps Procgen and owns the replay); use DataLoader(num_workers=0)"


def refuse_worker(name: str) -> None:
    """Env stepping stays in the main process: a DataLoader worker would act on a stale copy of the replay, and
    Procgen is not fork-safe. (A worker started by spawn or forkserver, Python 3.14's default, never gets this far:
    the stream refuses to be pickled for it, `ReplayStream.__reduce__`.)"""
    if get_worker_info() is not None:
        raise RuntimeError(main_process_only(name))


def epsilon_greedy(
    rng: np.random.Generator, policy: GreedyPolicy, replay: FrameReplay, epsilon: float, num_actions: int = NUM_ACTIONS
) -> np.ndarray:
    """Actions for the newest frame stacks in ``replay``; the network is skipped when every env explores.

    The rng is advanced identically whatever the policy returns, so exploration draws do not depend on it. The
    greedy actions are the one device -> host copy of the hot loop (Procgen needs them on the host).
    """
    n = replay.num_envs
    explore = rng.random(n) < epsilon
    random_actions = rng.integers(0, num_actions, size=n)
    if explore.all():
        return random_actions
    greedy = policy(replay.latest()).cpu().numpy()
    return np.where(explore, random_actions, greedy)


class Collector:
    """Owns one rank's envs and replay; a vector step is `launch` (act, Procgen steps in its own threads) then
    `finish` (observe, write the replay, episode statistics), so the learner can run in between.

    Args:
        env: this rank's envs (`driml_pl.types.VecEnv`).
        replay: the rank's frame ring.
        rng: numpy generator for exploration (saved in checkpoints).
        recent_episodes: how many finished episodes the running mean return covers.
    """

    def __init__(self, env: VecEnv, replay: FrameReplay, rng: np.random.Generator, recent_episodes: int = 100) -> None:
        self.env, self.replay, self.rng = env, replay, rng
        self.env_steps = 0  # completed vector steps x num_envs (a launched step counts once finished)
        self.episodes = 0
        self.recent_returns: deque[float] = deque(maxlen=recent_episodes)
        self.recent_lengths: deque[int] = deque(maxlen=recent_episodes)
        self._ep_return = np.zeros(env.num_envs, dtype=np.float64)
        self._ep_length = np.zeros(env.num_envs, dtype=np.int64)
        self._pending: np.ndarray | None = None  # actions of a launched, unfinished step
        self.replay.reset(env.observe())

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def launch(self, policy: GreedyPolicy, epsilon: float) -> None:
        """Choose the actions and start the vector step; Procgen runs it while the caller goes on."""
        assert self._pending is None, "finish() the launched step first"
        actions = epsilon_greedy(self.rng, policy, self.replay, epsilon, self.env.spec.num_actions)
        self.env.act(actions)
        self._pending = actions

    def finish(self) -> None:
        """Wait for the launched step and record it."""
        assert self._pending is not None, "no step was launched"
        actions, self._pending = self._pending, None
        rewards, frames, firsts = self.env.observe_step()
        self.replay.add(actions, rewards, firsts, frames)
        self.env_steps += self.env.num_envs
        self._ep_return += rewards
        self._ep_length += 1
        for i in np.flatnonzero(firsts):
            self.recent_returns.append(float(self._ep_return[i]))
            self.recent_lengths.append(int(self._ep_length[i]))
            self.episodes += 1
        self._ep_return[firsts] = 0.0
        self._ep_length[firsts] = 0

    def step(self, policy: GreedyPolicy, epsilon: float) -> None:
        self.launch(policy, epsilon)
        self.finish()

    def mean_return(self) -> float:
        return float(np.mean(self.recent_returns)) if self.recent_returns else float("nan")

    def mean_length(self) -> float:
        return float(np.mean(self.recent_lengths)) if self.recent_lengths else float("nan")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue but the replay (the checkpoint unit persists that incrementally): counters,
        episode accumulators, rng and env emulator state."""
        if self._pending is not None:
            raise RuntimeError("a vector step is in flight; checkpoints are taken between steps")
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "recent_returns": list(self.recent_returns),
            "recent_lengths": list(self.recent_lengths),
            "ep_return": self._ep_return.tolist(),
            "ep_length": self._ep_length.tolist(),
            "rng": self.rng.bit_generator.state,
            "env_state": self.env.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; the ring is left as it is (the checkpoint unit filled it, or `restart_replay` restarts it)."""
        self.env.set_state(list(state["env_state"]))
        self.env_steps = int(state["env_steps"])
        self.episodes = int(state["episodes"])
        self.recent_returns.clear()
        self.recent_returns.extend(state["recent_returns"])
        self.recent_lengths.clear()
        self.recent_lengths.extend(state["recent_lengths"])
        self._ep_return[:] = state["ep_return"]
        self._ep_length[:] = state["ep_length"]
        self.rng.bit_generator.state = state["rng"]

    def restart_replay(self) -> None:
        """An empty replay starting from the envs' current frames (resume without a saved replay)."""
        self.replay.t = -1
        self.replay.reset(self.env.observe())
