"""A uint8 frame ring per env stream, on the learner's device, sampled with one vectorised index array.

One torch implementation serves the CPU and the GPU: frames, actions, rewards and flags are tensors on
``device``, anchors are drawn there with a ``torch.Generator`` of that device, and every window below (n-step
returns, bootstrap and positive frames, frame stacks) is gathered there. New frames cross the bus once per vector
step, from a pinned staging buffer. The host keeps only the time counter.

Layout (time-major, so a vector step is one contiguous block and a checkpoint can append the new time slots as
contiguous byte ranges): slot ``t % capacity`` of env ``e`` holds the frame ``s_t`` and, once the env has been stepped
from it, the action ``a_t``, reward ``r_t`` and ``done_t`` (the episode ended with ``a_t``). ``first_t`` marks the first
frame of an episode. Procgen resets inside the terminal step, so when ``done_t`` the stored ``s_{t+1}`` already
belongs to the next episode; every window below stops at that boundary:

* n-step return ``R = sum_{j<n} gamma^j r_{t+j}``, truncated after the first ``done``; bootstrap discount
  ``gamma^n`` if no ``done`` in ``t..t+n-1``, else 0 (the bootstrap frame ``s_{t+n}`` is then irrelevant).
* InfoNCE positive ``s_{t+k}``: when the episode ends before ``t+k`` (``done_{t+m}`` with ``m < k``) the positive is the
  episode's last frame ``s_{t+m}`` and the effective ``k`` becomes ``m`` (it can be 0: ``s_t`` itself, only for the
  very last transition of an episode; the InfoNCE loss leaves such anchors out). The effective ``k`` is returned so
  it can be logged and used.
* frame stacks for ``s_t``: frames from before the episode's first frame are zeros.

Each frame is stored once: no next observation, no duplicated stacks (12,288 B of pixels plus 7 B per transition).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from driml_pl.envs import spec

ArrayLike = Tensor | np.ndarray


class ReplaySample(NamedTuple):
    obs: Tensor  # (B, S, 64, 64, 3) uint8
    action: Tensor  # (B,) int64
    returns: Tensor  # (B,) float32
    discount: Tensor  # (B,) float32
    next_obs: Tensor  # (B, S, 64, 64, 3) uint8
    positive_obs: Tensor  # (B, S, 64, 64, 3) uint8
    k: Tensor  # (B,) int64, effective horizon
    env: Tensor  # (B,) int64, env index (for tests and diagnostics)
    t: Tensor  # (B,) int64, absolute time index of s_t


FRAME_DTYPE = torch.uint8
FRAME_SHAPE: tuple[int, int, int] = spec().frame_shape  # the default backend's; a replay takes its env's
COLUMN_DTYPES = {"actions": torch.uint8, "rewards": torch.float32, "dones": torch.bool, "firsts": torch.bool}


def replay_bytes(capacity: int, num_envs: int, frame_shape: tuple[int, int, int] = FRAME_SHAPE) -> int:
    """The bytes a `FrameReplay` of ``capacity`` slots x ``num_envs`` allocates: a frame and the four columns per
    transition (12,295 B at 64x64x3), what `driml_pl.preflight` checks against free memory."""
    frame = math.prod(frame_shape) * FRAME_DTYPE.itemsize
    return capacity * num_envs * (frame + sum(dtype.itemsize for dtype in COLUMN_DTYPES.values()))


class FrameReplay:
    """Per-env rings of frames plus (action, reward, done, first) columns, all on ``device``.

    Args:
        num_envs: parallel env streams (one ring each).
        capacity: slots per env; total transitions held = num_envs * capacity.
        n_step: return horizon n.
        gamma: discount.
        max_k: largest InfoNCE horizon that will be asked for.
        frame_stack: frames per observation S, rebuilt from the ring at sample time.
        device: where the ring lives and is sampled (the learner's device).
        compile_gather: plan the stream's samples (``gather(check=False)``) through ``torch.compile``: the index
            arithmetic and the column reads become a few fused kernels instead of some forty dispatched ops; the
            frame copy stays one eager ``index_select`` (inductor's own gather of the frames was twice as slow on the
            CPU). Equal to the eager gather, bitwise (tested). Compiling takes seconds at the first sample.
        compile_writes: write each vector step (`add`) through ``torch.compile``: one upload of the step's columns
            with its slot, one of its frames, then one fused write, instead of some twenty dispatched ops. Equal to
            the eager write, bitwise (tested). Only where the slot index is exact in float32 (capacity <= 2**24).
        frame_shape: the env's frame, HWC uint8 (``env.spec.frame_shape``, `driml_pl.types.EnvSpec`).
    """

    def __init__(
        self,
        num_envs: int,
        capacity: int,
        n_step: int,
        gamma: float,
        max_k: int,
        frame_stack: int = 1,
        device: torch.device | str = "cpu",
        compile_gather: bool = False,
        compile_writes: bool = False,
        frame_shape: tuple[int, int, int] = FRAME_SHAPE,
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
        self.device = torch.device(device)
        self.frame_shape = tuple(frame_shape)
        dev = self.device
        # empty + zero_ writes every page now: the lazily mapped pages of torch.zeros would fault one by one inside the
        # hot loop instead (5 ms per vector step of 16 envs on the dev VM, against 0.4 s up front for 1.2 GB)
        self.frames = torch.empty((capacity, num_envs, *self.frame_shape), dtype=FRAME_DTYPE, device=dev).zero_()
        self.actions = torch.zeros((capacity, num_envs), dtype=COLUMN_DTYPES["actions"], device=dev)
        self.rewards = torch.zeros((capacity, num_envs), dtype=COLUMN_DTYPES["rewards"], device=dev)
        self.dones = torch.zeros((capacity, num_envs), dtype=COLUMN_DTYPES["dones"], device=dev)
        self.firsts = torch.zeros((capacity, num_envs), dtype=COLUMN_DTYPES["firsts"], device=dev)
        # row views: one row per (slot, env), gathered with index_select (a memcpy per row on either device)
        self._frame_rows = self.frames.view(capacity * num_envs, -1)
        self.t = -1  # absolute time index of the newest frame; -1 before `reset`
        self._discounts = (gamma ** torch.arange(n_step, dtype=torch.float64)).float().to(dev)
        self._env_ids = torch.arange(num_envs, device=dev)
        self._window_offsets = torch.arange(self.window, device=dev)
        self._stack_offsets = torch.arange(frame_stack - 1, -1, -1, device=dev)  # oldest .. newest
        self._staging = _Staging(num_envs, dev, self.frame_shape)
        self.compile_gather = compile_gather
        self._compiled_gather: Any = None  # torch.compile(_gather_plan), built at the first sample
        # the slot travels in the float32 block of the step's columns (`_Staging.block`): exact up to 2**24
        self.compile_writes = compile_writes and capacity <= 2**24
        self._compiled_write: Any = None  # torch.compile(_write), built at the first write

    @property
    def bytes_per_transition(self) -> int:
        arrays = (self.frames, self.actions, self.rewards, self.dones, self.firsts)
        return sum(a.element_size() * a.numel() for a in arrays) // (self.num_envs * self.capacity)

    def reset(self, frames: ArrayLike) -> None:
        """Store the first frames s_0 of every env."""
        self.t = 0
        self.frames[0] = self._staging.frames(frames)
        self.firsts[0] = True

    def add(self, actions: ArrayLike, rewards: ArrayLike, dones: ArrayLike, next_frames: ArrayLike) -> None:
        """Record (a_t, r_t, done_t) for the newest frame s_t of every env, then store s_{t+1}.

        Host arrays are uploaded once, without waiting for the device (pinned staging, non-blocking copies).
        """
        slot = self.t % self.capacity
        block = self._staging.block(actions, rewards, dones, slot)
        if self.compile_writes:
            if self._compiled_write is None:
                self._compiled_write = torch.compile(self._write, dynamic=False, fullgraph=True)
            self._compiled_write(block, self._staging.frames(next_frames))
            self.t += 1
            return
        d = block[2] > 0.5
        self.actions[slot] = block[0].to(torch.uint8)
        self.rewards[slot] = block[1]
        self.dones[slot] = d
        self.t += 1
        slot = self.t % self.capacity
        self.frames[slot] = self._staging.frames(next_frames)
        self.firsts[slot] = d

    def _write(self, block: Tensor, frames: Tensor) -> None:
        """`add`'s writes from the step's (4, N) block (action, reward, done, slot) and its frames, with the slot on
        the device (``index_copy_``: a tensor index, so one compiled write serves every slot)."""
        slot = block[3, :1].long()
        done = block[None, 2] > 0.5
        self.actions.index_copy_(0, slot, block[None, 0].to(torch.uint8))
        self.rewards.index_copy_(0, slot, block[None, 1])
        self.dones.index_copy_(0, slot, done)
        following = (slot + 1) % self.capacity
        self.frames.index_copy_(0, following, frames[None])
        self.firsts.index_copy_(0, following, done)

    def valid_range(self) -> tuple[int, int]:
        """Inclusive [lo, hi] of anchor times t whose stack and whole window are still in the ring."""
        lo = max(0, self.t - self.capacity + self.frame_stack)
        return lo, self.t - self.window

    def num_valid(self) -> int:
        lo, hi = self.valid_range()
        return max(0, hi - lo + 1) * self.num_envs

    def _index(self, x: ArrayLike) -> Tensor:
        return torch.as_tensor(x, dtype=torch.int64).to(self.device)

    def _rows(self, env: Tensor, t: Tensor) -> Tensor:
        """Flat row index of (env, time) in the time-major columns."""
        return (t % self.capacity) * self.num_envs + env

    def _column(self, column: Tensor, env: Tensor, t: Tensor) -> Tensor:
        return column.view(-1)[self._rows(env, t)]

    def stacked(self, env: ArrayLike, t: ArrayLike) -> Tensor:
        """Frame stacks ending at times ``t`` of envs ``env``: (len(t), S, 64, 64, 3), oldest first.

        Frames that precede the first frame of ``s_t``'s episode are zeros.
        """
        env, t = self._index(env), self._index(t)
        return self._stack_frames(*self._stack_plan(env, t))

    def _stack_plan(self, env: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """The frame rows of the stacks ending at (env, t), (B * S,), and which frames to keep, (B, S) bool (None for
        single frames): the index arithmetic of `stacked`, without the frame copy."""
        s = self.frame_stack
        times = t[:, None] - self._stack_offsets[None, :]
        rows = self._rows(env[:, None], times).reshape(-1)
        if s == 1:
            return rows, None
        # frame t-j is kept iff no episode starts in (t-j, t]: a first at t-i (i < j) cuts everything older.
        newer = t[:, None] - self._stack_offsets.flip(0)[None, : s - 1]
        cut = torch.cumsum(self._column(self.firsts, env[:, None], newer).int(), dim=1) > 0  # a first in [t-i, t]
        # column for frame t-j (j >= 1) looks at firsts in (t-j, t]; the newest frame is always kept
        keep = torch.cat([~cut.flip(1), torch.ones_like(cut[:, :1])], dim=1)
        return rows, keep

    def _stack_frames(self, rows: Tensor, keep: Tensor | None) -> Tensor:
        """Copy the planned frame rows out of the ring (one ``index_select``, a memcpy per row) and zero the frames
        the plan drops."""
        out = self._frame_rows.index_select(0, rows).view(-1, self.frame_stack, *self.frame_shape)
        return out if keep is None else out * keep[:, :, None, None, None]

    def latest(self) -> Tensor:
        """The newest frame stack of every env (what the policy acts on): (N, S, 64, 64, 3)."""
        if self.frame_stack == 1:
            return self.frames[self.t % self.capacity].unsqueeze(1)
        return self.stacked(self._env_ids, torch.full((self.num_envs,), self.t, device=self.device))

    def sample_anchors(self, gen: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
        """Anchors (env, t) drawn uniformly over envs and valid times, on the replay's device."""
        lo, hi = self.valid_range()
        if hi < lo:
            raise RuntimeError(f"replay holds no complete window yet (newest t={self.t}, window {self.window})")
        env = torch.randint(0, self.num_envs, (batch_size,), generator=gen, device=self.device)
        t = torch.randint(lo, hi + 1, (batch_size,), generator=gen, device=self.device)
        return env, t

    def sample(self, gen: torch.Generator, batch_size: int, k: ArrayLike) -> ReplaySample:
        """Draw ``batch_size`` anchors uniformly over envs and valid times, with horizons ``k`` (1 <= k <= max_k)."""
        env, t = self.sample_anchors(gen, batch_size)
        return self.gather(env, t, k)

    def action_window(self, env: ArrayLike, t: ArrayLike, length: int) -> tuple[Tensor, Tensor]:
        """Actions a_{t-1} .. a_{t+length-1} and which consecutive pairs lie inside one episode.

        Shape:
            Returns: actions (B, length + 1) int64; pair_valid (B, length) bool, where pair j is
            (a_{t+j-1}, a_{t+j}): pair 0 is invalid when s_t starts an episode, pair j >= 1 when done_{t+j-1}.
        """
        if length > self.window:
            raise ValueError(f"action window {length} exceeds the replay window {self.window}")
        env, t = self._index(env), self._index(t)
        offsets = torch.arange(-1, length, device=self.device)
        times = t[:, None] + offsets[None, :]
        actions = self._column(self.actions, env[:, None], times).long()
        valid = torch.empty((len(t), length), dtype=torch.bool, device=self.device)
        valid[:, 0] = ~self._column(self.firsts, env, t)
        valid[:, 1:] = ~self._column(self.dones, env[:, None], times[:, 1:-1])
        return actions, valid

    def gather(self, env: ArrayLike, t: ArrayLike, k: ArrayLike, check: bool = True) -> ReplaySample:
        """Build the sample for explicit anchors (env, t) and horizons k. Vectorised over the batch.

        ``check`` validates k on the host (a device sync); the stream draws k in range and skips it, and with
        ``compile_gather`` its samples go through the compiled form of the same function.
        """
        env, t, k = self._index(env), self._index(t), self._index(k)
        if check and (k.shape != t.shape or int(k.min()) < 1 or int(k.max()) > self.max_k):
            raise ValueError(f"k must have shape {tuple(t.shape)} with values in [1, {self.max_k}]")
        plan = self._gather_plan
        if self.compile_gather and not check:
            if self._compiled_gather is None:
                # no CUDA graphs: the stream holds several minibatches at once, which a graph's replay would overwrite
                self._compiled_gather = torch.compile(self._gather_plan, dynamic=False, fullgraph=True)
            plan = self._compiled_gather
        rows, keep, action, returns, discount, k_eff = plan(env, t, k)
        frames = self._stack_frames(rows, keep)  # the bulk copy stays one eager index_select on either path
        b = t.shape[0]
        obs, next_obs, positive_obs = frames[:b], frames[b : 2 * b], frames[2 * b :]
        return ReplaySample(obs, action, returns, discount, next_obs, positive_obs, k_eff, env, t)

    def _gather_plan(self, env: Tensor, t: Tensor, k: Tensor) -> tuple[Any, ...]:
        """`gather`'s arithmetic on device tensors, everything but the frame copy: the frame rows of (s_t, s_{t+n},
        s_{t+k}) and their keep mask (`_stack_plan`), then action, returns, discount and the effective k."""
        window = t[:, None] + self._window_offsets[None, :]
        rows = self._rows(env[:, None], window)  # (B, window): one row index for every column read
        rewards = self.rewards.view(-1)[rows]
        dones = self.dones.view(-1)[rows]
        n = self.n_step
        alive_after = torch.cumprod((~dones).float(), dim=1)  # alive_after[:, j]: no done in t..t+j
        alive_before = torch.cat([torch.ones_like(alive_after[:, :1]), alive_after[:, :-1]], dim=1)  # t..t+j-1
        returns = (rewards[:, :n] * alive_before[:, :n] * self._discounts).sum(dim=1)
        discount = self.gamma**n * alive_after[:, n - 1]
        # steps to the episode's last frame inside the window (window length if it does not end there)
        end = torch.where(dones.any(dim=1), dones.int().argmax(dim=1), self.window)
        k_eff = torch.minimum(k, end)
        frame_rows, keep = self._stack_plan(torch.cat([env, env, env]), torch.cat([t, t + n, t + k_eff]))
        action = self.actions.view(-1)[rows[:, 0]].long()
        return frame_rows, keep, action, returns, discount, k_eff


class _Staging:
    """Host -> device uploads of one vector step.

    On CUDA each kind of upload has two pinned buffers used in turn; a buffer is refilled only after the copy that
    read it (two steps ago, long finished) has completed, so the copies never wait for the device's queue.
    """

    def __init__(self, num_envs: int, device: torch.device, frame_shape: tuple[int, ...] = FRAME_SHAPE) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        shapes = {
            "frames": ((num_envs, *frame_shape), torch.uint8),
            "block": ((4, num_envs), torch.float32),
        }
        self._buffers: dict[str, list[Tensor]] = {}
        self._events: dict[str, list[Any]] = {}
        self._turn: dict[str, int] = {}
        if self.cuda:
            for name, (shape, dtype) in shapes.items():
                self._buffers[name] = [torch.empty(shape, dtype=dtype).pin_memory() for _ in range(2)]
                self._events[name] = [None, None]
                self._turn[name] = 0

    def _upload(self, name: str, host: Tensor) -> Tensor:
        i = self._turn[name]
        event = self._events[name][i]
        if event is not None:
            event.synchronize()
        buffer = self._buffers[name][i]
        buffer.copy_(host)
        out = buffer.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[name][i] = event
        self._turn[name] = 1 - i
        return out

    def frames(self, frames: ArrayLike) -> Tensor:
        host = torch.as_tensor(frames)
        return self._upload("frames", host) if self.cuda else host.to(self.device)

    def block(self, actions: ArrayLike, rewards: ArrayLike, dones: ArrayLike, slot: int) -> Tensor:
        """(action, reward, done, slot) per env as one (4, N) float32 block on the device, in one upload (the slot
        row is read by the compiled write only)."""
        n = len(np.asarray(dones))
        rows = [np.asarray(x, dtype=np.float32) for x in (actions, rewards, dones)] + [np.full(n, slot, np.float32)]
        host = torch.from_numpy(np.stack(rows))
        return self._upload("block", host) if self.cuda else host
