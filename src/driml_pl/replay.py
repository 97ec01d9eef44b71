"""A uint8 frame ring per env stream, sampled with one vectorised index array (no torch in here).

Layout: slot ``t % capacity`` of env ``e`` holds the frame ``s_t`` and, once the env has been stepped from it, the
action ``a_t``, reward ``r_t`` and ``done_t`` (the episode ended with ``a_t``). ``first_t`` marks the first frame of an
episode. Procgen resets inside the terminal step, so when ``done_t`` the stored ``s_{t+1}`` already belongs to the next
episode; every window below stops at that boundary:

* n-step return ``R = sum_{j<n} gamma^j r_{t+j}``, truncated after the first ``done``; bootstrap discount
  ``gamma^n`` if no ``done`` in ``t..t+n-1``, else 0 (the bootstrap frame ``s_{t+n}`` is then irrelevant).
* InfoNCE positive ``s_{t+k}``: when the episode ends before ``t+k`` (``done_{t+m}`` with ``m < k``) the positive is the
  episode's last frame ``s_{t+m}`` and the effective ``k`` becomes ``m`` (it can be 0: ``s_t`` itself, only for the
  very last transition of an episode). The effective ``k`` is returned so it can be logged.
* frame stacks for ``s_t``: frames from before the episode's first frame are zeros.

Each frame is stored once: no next observation, no duplicated stacks (12,288 B of pixels plus 7 B per transition).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from driml_pl.envs import FRAME_SHAPE


class ReplaySample(NamedTuple):
    obs: np.ndarray  # (B, S, 64, 64, 3) uint8
    action: np.ndarray  # (B,) int64
    returns: np.ndarray  # (B,) float32
    discount: np.ndarray  # (B,) float32
    next_obs: np.ndarray  # (B, S, 64, 64, 3) uint8
    positive_obs: np.ndarray  # (B, S, 64, 64, 3) uint8
    k: np.ndarray  # (B,) int64, effective horizon
    env: np.ndarray  # (B,) int64, env index (for tests and diagnostics)
    t: np.ndarray  # (B,) int64, absolute time index of s_t


class FrameReplay:
    """Per-env rings of frames plus (action, reward, done, first) columns.

    Args:
        num_envs: parallel env streams (one ring each).
        capacity: slots per env; total transitions held = num_envs * capacity.
        n_step: return horizon n.
        gamma: discount.
        max_k: largest InfoNCE horizon that will be asked for.
        frame_stack: frames per observation S, rebuilt from the ring at sample time.
    """

    def __init__(
        self, num_envs: int, capacity: int, n_step: int, gamma: float, max_k: int, frame_stack: int = 1
    ) -> None:
        if n_step < 1 or max_k < 1 or frame_stack < 1:
            raise ValueError("n_step, max_k and frame_stack must all be >= 1")
        self.window = max(n_step, max_k)  # steps after t that a sample reads
        if capacity < self.window + frame_stack + 1:
            raise ValueError(
                f"replay capacity per env ({capacity}) must exceed n_step/max_k + frame_stack "
                f"({self.window + frame_stack}); raise data.replay_size"
            )
        self.num_envs, self.capacity = num_envs, capacity
        self.n_step, self.gamma, self.max_k, self.frame_stack = n_step, gamma, max_k, frame_stack
        self.frames = np.zeros((num_envs, capacity, *FRAME_SHAPE), dtype=np.uint8)
        self.actions = np.zeros((num_envs, capacity), dtype=np.uint8)
        self.rewards = np.zeros((num_envs, capacity), dtype=np.float32)
        self.dones = np.zeros((num_envs, capacity), dtype=bool)
        self.firsts = np.zeros((num_envs, capacity), dtype=bool)
        self.t = -1  # absolute time index of the newest frame; -1 before `reset`
        self._discounts = gamma ** np.arange(n_step, dtype=np.float64)

    @property
    def bytes_per_transition(self) -> int:
        arrays = (self.frames, self.actions, self.rewards, self.dones, self.firsts)
        return sum(a.nbytes for a in arrays) // (self.num_envs * self.capacity)

    def reset(self, frames: np.ndarray) -> None:
        """Store the first frames s_0 of every env."""
        self.t = 0
        self.frames[:, 0] = frames
        self.firsts[:, 0] = True

    def add(self, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray, next_frames: np.ndarray) -> None:
        """Record (a_t, r_t, done_t) for the newest frame s_t of every env, then store s_{t+1}."""
        slot = self.t % self.capacity
        self.actions[:, slot] = actions
        self.rewards[:, slot] = rewards
        self.dones[:, slot] = dones
        self.t += 1
        slot = self.t % self.capacity
        self.frames[:, slot] = next_frames
        self.firsts[:, slot] = dones

    def valid_range(self) -> tuple[int, int]:
        """Inclusive [lo, hi] of anchor times t whose stack and whole window are still in the ring."""
        lo = max(0, self.t - self.capacity + self.frame_stack)
        return lo, self.t - self.window

    def num_valid(self) -> int:
        lo, hi = self.valid_range()
        return max(0, hi - lo + 1) * self.num_envs

    def stacked(self, env: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Frame stacks ending at times ``t`` of envs ``env``: (len(t), S, 64, 64, 3), oldest first.

        Frames that precede the first frame of ``s_t``'s episode are zeros.
        """
        s = self.frame_stack
        offsets = np.arange(s - 1, -1, -1)  # oldest .. newest
        times = t[:, None] - offsets[None, :]
        out = self.frames[env[:, None], times % self.capacity]
        if s > 1:
            # frame t-j is kept iff no episode starts in (t-j, t]: a first at t-i (i < j) cuts everything older.
            newer_first = self.firsts[env[:, None], (t[:, None] - np.arange(s - 1)[None, :]) % self.capacity]
            cut = np.cumsum(newer_first, axis=1) > 0  # cut[:, i]: a first at or after t-i
            keep = np.ones((len(t), s), dtype=bool)
            keep[:, :-1] = ~cut[:, ::-1]  # column for frame t-j (j >= 1) looks at firsts in (t-j, t]
            out *= keep[:, :, None, None, None]
        return out

    def latest(self) -> np.ndarray:
        """The newest frame stack of every env (what the policy acts on): (N, S, 64, 64, 3)."""
        env = np.arange(self.num_envs)
        return self.stacked(env, np.full(self.num_envs, self.t))

    def sample_anchors(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Anchors (env, t) drawn uniformly over envs and valid times."""
        lo, hi = self.valid_range()
        if hi < lo:
            raise RuntimeError(f"replay holds no complete window yet (newest t={self.t}, window {self.window})")
        return rng.integers(0, self.num_envs, size=batch_size), rng.integers(lo, hi + 1, size=batch_size)

    def sample(self, rng: np.random.Generator, batch_size: int, k: np.ndarray) -> ReplaySample:
        """Draw ``batch_size`` anchors uniformly over envs and valid times, with horizons ``k`` (1 <= k <= max_k)."""
        env, t = self.sample_anchors(rng, batch_size)
        return self.gather(env, t, k)

    def action_window(self, env: np.ndarray, t: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Actions a_{t-1} .. a_{t+length-1} and which consecutive pairs lie inside one episode.

        Shape:
            Returns: actions (B, length + 1) int64; pair_valid (B, length) bool, where pair j is
            (a_{t+j-1}, a_{t+j}): pair 0 is invalid when s_t starts an episode, pair j >= 1 when done_{t+j-1}.
        """
        if length > self.window:
            raise ValueError(f"action window {length} exceeds the replay window {self.window}")
        times = (t[:, None] + np.arange(-1, length)[None, :]) % self.capacity
        actions = self.actions[env[:, None], times].astype(np.int64)
        valid = np.empty((len(t), length), dtype=bool)
        valid[:, 0] = ~self.firsts[env, t % self.capacity]
        valid[:, 1:] = ~self.dones[env[:, None], times[:, 1:-1]]
        return actions, valid

    def gather(self, env: np.ndarray, t: np.ndarray, k: np.ndarray) -> ReplaySample:
        """Build the sample for explicit anchors (env, t) and horizons k. Vectorised over the batch."""
        if k.shape != t.shape or k.min() < 1 or k.max() > self.max_k:
            raise ValueError(f"k must have shape {t.shape} with values in [1, {self.max_k}]")
        window = (t[:, None] + np.arange(self.window)[None, :]) % self.capacity
        rewards = self.rewards[env[:, None], window]
        dones = self.dones[env[:, None], window]
        n = self.n_step
        alive_after = np.cumprod(~dones, axis=1)  # alive_after[:, j]: no done in t..t+j
        alive_before = np.ones_like(alive_after)
        alive_before[:, 1:] = alive_after[:, :-1]  # no done in t..t+j-1
        returns = (rewards[:, :n] * alive_before[:, :n] * self._discounts).sum(axis=1)
        discount = self.gamma**n * alive_after[:, n - 1]
        # steps to the episode's last frame inside the window (window length if it does not end there)
        end = np.where(dones.any(axis=1), dones.argmax(axis=1), self.window)
        k_eff = np.minimum(k, end)
        frames = self.stacked(np.concatenate([env, env, env]), np.concatenate([t, t + n, t + k_eff]))
        b = len(t)
        return ReplaySample(
            obs=frames[:b],
            action=self.actions[env, t % self.capacity].astype(np.int64),
            returns=returns.astype(np.float32),
            discount=discount.astype(np.float32),
            next_obs=frames[b : 2 * b],
            positive_obs=frames[2 * b :],
            k=k_eff.astype(np.int64),
            env=env,
            t=t,
        )

    def state_dict(self) -> dict[str, np.ndarray | int]:
        return {
            "t": self.t,
            "frames": self.frames,
            "actions": self.actions,
            "rewards": self.rewards,
            "dones": self.dones,
            "firsts": self.firsts,
        }

    def load_state_dict(self, state: dict[str, np.ndarray | int]) -> None:
        for name in ("frames", "actions", "rewards", "dones", "firsts"):
            saved = np.asarray(state[name])
            mine = getattr(self, name)
            if saved.shape != mine.shape:
                raise ValueError(f"saved replay {name} has shape {saved.shape}, this run expects {mine.shape}")
            mine[...] = saved
        self.t = int(state["t"])
