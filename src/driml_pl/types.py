"""Named batch types passed between the data stream and the LightningModule, and the seams between the rooms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # the env seam (EnvSpec, VecEnv) is imported without torch: tools/procgen_fixture.py, say
    from torch import Tensor


class RolloutStats(NamedTuple):
    """What the actors did up to the moment a batch was drawn (this rank only; scalars)."""

    env_steps: int  # env steps on this rank (multiply by world size for the global count)
    episodes: int  # episodes finished on this rank
    episode_return: float  # mean return of the recent finished episodes, nan before the first one
    episode_length: float  # mean length of the same episodes, nan before the first one
    epsilon: float  # exploration rate used for the last env step
    last: bool = False  # the last update the env-step budget allows
    recent: int = 0  # finished episodes the two means cover (this rank's last 100 at most)


class Batch(NamedTuple):
    """One replayed minibatch. Frames stay uint8 HWC until the module preprocesses them on the device.

    Shapes (B = batch size, S = frame stack):
        obs, next_obs, positive_obs: (B, S, 64, 64, 3) uint8 -- s_t, s_{t+n} (bootstrap), s_{t+k} (InfoNCE positive)
        action: (B,) int64 -- a_t
        returns: (B,) float32 -- n-step discounted return, truncated at a terminal
        discount: (B,) float32 -- gamma**n * (1 - done within the n steps)
        k: (B,) int64 -- the effective horizon of each positive (after truncation at an episode end)
        action_window: (B, K + 1) int64 -- effective actions a_{t-1} .. a_{t+K-1} (adaptive horizon only, else None)
        pair_valid: (B, K) bool -- which consecutive pairs of action_window lie in one episode (adaptive only)
    """

    obs: Tensor
    action: Tensor
    returns: Tensor
    discount: Tensor
    next_obs: Tensor
    positive_obs: Tensor
    k: Tensor
    stats: RolloutStats
    action_window: Tensor | None = None
    pair_valid: Tensor | None = None


StepBatch = tuple[Batch, ...]
"""What one Lightning training step carries: its ``data.updates_per_batch`` minibatches, in order (fewer at the end
of the budget). The stream yields it, ``training_step`` consumes it, and Lightning hands it to every callback's
``on_train_batch_end`` as ``batch``: read it with `step_minibatches` / `step_stats`, never as a bare `Batch`."""


def step_minibatches(batch: Batch | StepBatch) -> StepBatch:
    """The minibatches of a step (a bare `Batch`, as a unit test may pass, is a step of one)."""
    return (batch,) if isinstance(batch, Batch) else batch  # Batch is a NamedTuple: tested before tuples


def step_stats(batch: Any) -> RolloutStats | None:
    """The rollout statistics after a step: those of its last minibatch; None for anything that is not a step."""
    if isinstance(batch, Batch):
        return batch.stats
    if isinstance(batch, tuple) and batch and all(isinstance(b, Batch) for b in batch):
        return batch[-1].stats
    return None


class GreedyPolicy(Protocol):
    """Maps a batch of uint8 frame stacks (N, S, 64, 64, 3) on the replay's device to greedy actions (N,)."""

    def __call__(self, obs: Tensor) -> Tensor: ...


class Actor(Protocol):
    """What the data stream acts with: the learner's snapshot (`driml_pl.learner.actor.ActorSnapshot`).

    ``refresh`` copies the learner's weights into the snapshot (the stream calls it once per Lightning step),
    ``act`` maps frame stacks to greedy actions on the host, ``continuation`` is DRIML-ada's (15, 15) matrix of
    continuation probabilities as of the last refresh, on the learner's device (``adaptive`` says whether it exists).
    """

    adaptive: bool

    def refresh(self) -> None: ...

    def act(self, obs: Tensor) -> Tensor: ...

    def continuation(self) -> Tensor: ...


@runtime_checkable
class FiniteGuarded(Protocol):
    """A module that knows whether a loss term went NaN or Inf (`driml_pl.learner.guard`); the checkpoint callback
    asks it before writing a unit, and after an exception."""

    def check_finite(self, all_ranks: bool = False) -> None: ...

    def nonfinite_update(self) -> int | None: ...


class EnvSpec(NamedTuple):
    """What an environment backend gives the rest of the trainer: the frame every env returns and the action layout.
    The replay, the evaluation and the Q-head size themselves from it (`driml_pl.envs.spec`)."""

    frame_shape: tuple[int, int, int]  # HWC, uint8
    actions: tuple[str, ...]  # the name of each discrete action, by index

    @property
    def num_actions(self) -> int:
        return len(self.actions)


class VecEnv(Protocol):
    """A batch of environments stepped in lockstep with a reset-free interface (`driml_pl.envs`: one backend is one
    file that provides this, ``SPEC`` and ``make``).

    ``step(actions)`` returns ``(reward, next_frame, first)``: (N,) float32, (N, *frame_shape) uint8, (N,) bool, where
    ``first[i]`` says that ``next_frame[i]`` is the first frame of a new episode (the action ended env ``i``'s episode
    and the env already reset; the terminal frame is never shown). ``act`` starts a step and ``observe_step`` waits
    for it, so the caller can work while the envs step; ``get_state``/``set_state`` are the emulator states a
    checkpoint keeps.
    """

    num_envs: int
    spec: EnvSpec

    def observe(self) -> np.ndarray: ...

    def act(self, actions: np.ndarray) -> None: ...

    def observe_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def level_seeds(self) -> np.ndarray: ...

    def get_state(self) -> list[bytes]: ...

    def set_state(self, states: list[bytes]) -> None: ...

    def close(self) -> None: ...
