"""The frame ring against a naive per-sample reference on a scripted stream with terminals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driml_pl.data.replay import FrameReplay, ReplaySample

E, STEPS = 3, 90


def as_numpy(sample: ReplaySample) -> ReplaySample:
    return ReplaySample(*(np.asarray(x.cpu()) for x in sample))


def frame_code(frames) -> np.ndarray:
    """Decode the absolute time written into a scripted frame (-1 for an all-zero padding frame)."""
    frames = np.asarray(frames.cpu()) if isinstance(frames, torch.Tensor) else frames
    code = frames[..., 0, 0, 0].astype(np.int64) + 256 * frames[..., 0, 0, 1].astype(np.int64)
    return np.where(frames[..., 0, 0, 2] == 1, code, -1)


def scripted(
    capacity: int,
    n_step: int = 3,
    max_k: int = 4,
    frame_stack: int = 1,
    gamma: float = 0.9,
    device: str = "cpu",
    steps: int = STEPS,
    compile_writes: bool = False,
):
    """A replay filled with frames that encode their own time, random rewards and frequent terminals."""
    rng = np.random.default_rng(0)
    replay = FrameReplay(E, capacity, n_step, gamma, max_k, frame_stack, device, compile_writes=compile_writes)

    def frames_at(t: int) -> np.ndarray:
        f = np.zeros((E, 64, 64, 3), dtype=np.uint8)
        f[:, 0, 0, 0], f[:, 0, 0, 1], f[:, 0, 0, 2] = t % 256, t // 256, 1
        f[:, 5, 5, 0] = np.arange(E)
        return f

    log = {"actions": [], "rewards": [], "dones": []}
    replay.reset(frames_at(0))
    for t in range(steps):
        a = rng.integers(0, 15, size=E)
        r = rng.normal(size=E).astype(np.float32)
        d = rng.random(E) < 0.12
        replay.add(a, r, d, frames_at(t + 1))
        log["actions"].append(a)
        log["rewards"].append(r)
        log["dones"].append(d)
    return replay, {k: np.stack(v, axis=1) for k, v in log.items()}  # (E, STEPS)


def naive(log, e, t, n, gamma, k):
    ret, disc, alive = 0.0, gamma**n, True
    for j in range(n):
        ret += gamma**j * log["rewards"][e, t + j]
        if log["dones"][e, t + j]:
            disc, alive = 0.0, False
            break
    del alive
    k_eff = k
    for j in range(k):
        if log["dones"][e, t + j]:
            k_eff = j
            break
    return ret, disc, k_eff


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_nstep_returns_discounts_bootstrap_and_positives_match_reference(device):
    n, gamma = 3, 0.9
    replay, log = scripted(capacity=STEPS + 5, n_step=n, gamma=gamma, device=device)
    lo, hi = replay.valid_range()
    assert (lo, hi) == (0, STEPS - 4)  # window = max(n, max_k) = 4
    env = np.repeat(np.arange(E), hi - lo + 1)
    t = np.tile(np.arange(lo, hi + 1), E)
    k = (t % 4) + 1
    s = as_numpy(replay.gather(env, t, k))
    assert (frame_code(s.obs[:, 0]) == t).all()
    assert (frame_code(s.next_obs[:, 0]) == t + n).all()  # s_{t+n}, not s_{t+1}
    assert (s.obs[:, 0, 5, 5, 0] == env).all()
    for i in range(len(t)):
        ret, disc, k_eff = naive(log, env[i], t[i], n, gamma, k[i])
        assert s.returns[i] == pytest.approx(ret, rel=1e-5, abs=1e-6)
        assert s.discount[i] == pytest.approx(disc)
        assert s.k[i] == k_eff
        assert s.action[i] == log["actions"][env[i], t[i]]
    # positives are exactly s_{t+k_eff} and never cross an episode end
    assert (frame_code(s.positive_obs[:, 0]) == t + s.k).all()
    for i in range(len(t)):
        assert not log["dones"][env[i], t[i] : t[i] + s.k[i]].any()
    assert (s.k < k).any(), "the script should contain truncated positives"
    assert (s.discount == 0).any() and (s.discount > 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_ring_wraps_and_only_samples_retained_windows(device):
    replay, _ = scripted(capacity=20, n_step=3, max_k=4, device=device)
    lo, hi = replay.valid_range()
    assert (lo, hi) == (STEPS - 20 + 1, STEPS - 4)
    s = as_numpy(replay.sample(torch.Generator(device).manual_seed(1), 500, np.full(500, 4)))
    assert s.t.min() >= lo and s.t.max() <= hi
    assert (frame_code(s.obs[:, 0]) == s.t).all()
    assert (frame_code(s.next_obs[:, 0]) == s.t + 3).all()


@pytest.mark.parametrize("device", DEVICES)
def test_frame_stacks_rebuilt_and_zeroed_before_episode_start(device):
    replay, log = scripted(capacity=STEPS + 5, frame_stack=4, device=device)
    lo, hi = replay.valid_range()
    env = np.repeat(np.arange(E), hi - lo + 1)
    t = np.tile(np.arange(lo, hi + 1), E)
    s = as_numpy(replay.gather(env, t, np.ones_like(t)))
    codes = frame_code(s.obs)  # (B, 4) oldest .. newest
    firsts = np.ones((E, STEPS + 1), dtype=bool)
    firsts[:, 1:] = log["dones"]
    for i in range(len(t)):
        start = max(u for u in range(t[i] + 1) if firsts[env[i], u])  # first frame of s_t's episode
        expected = [t[i] - j if t[i] - j >= start else -1 for j in (3, 2, 1, 0)]
        assert codes[i].tolist() == expected
    # acting sees the same stacks as learning
    latest = frame_code(replay.latest())
    assert (latest[:, -1] == STEPS).all()


def test_bytes_per_transition_store_each_frame_once():
    replay = FrameReplay(num_envs=4, capacity=100, n_step=7, gamma=0.99, max_k=2)
    assert replay.bytes_per_transition == 64 * 64 * 3 + 1 + 4 + 1 + 1  # frame, action, reward, done, first


def test_sample_rejects_bad_horizons_and_empty_replay():
    replay = FrameReplay(num_envs=2, capacity=50, n_step=3, gamma=0.99, max_k=2)
    replay.reset(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="no complete window"):
        replay.sample(torch.Generator(), 4, np.ones(4, dtype=np.int64))
    for _ in range(10):
        replay.add(np.zeros(2), np.zeros(2), np.zeros(2, bool), np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="values in"):
        replay.sample(torch.Generator(), 4, np.full(4, 3))
    with pytest.raises(ValueError, match="replay_size"):
        FrameReplay(num_envs=2, capacity=5, n_step=7, gamma=0.99, max_k=2)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frame_stack", [1, 3])
def test_compiled_gather_equals_the_eager_gather_bitwise(device, frame_stack):
    """`compile_gather` (data.compile_sampling) runs the same function through torch.compile: every field equal."""
    replay, _ = scripted(capacity=40, n_step=3, max_k=4, frame_stack=frame_stack, device=device)
    lo, hi = replay.valid_range()
    gen = torch.Generator(device).manual_seed(2)
    for _ in range(3):  # one compilation, then reuse with new anchors
        env = torch.randint(0, E, (64,), generator=gen, device=device)
        t = torch.randint(lo, hi + 1, (64,), generator=gen, device=device)
        k = torch.randint(1, 5, (64,), generator=gen, device=device)
        replay.compile_gather = False
        eager = replay.gather(env, t, k, check=False)
        replay.compile_gather = True
        compiled = replay.gather(env, t, k, check=False)
        for name, a, b in zip(ReplaySample._fields, eager, compiled, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert replay._compiled_gather is not None


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_writes_equal_the_eager_writes_bitwise(device):
    """`compile_writes` (data.compile_sampling) writes each vector step with one compiled function and the slot on the
    device: after 90 steps through a ring of 40 slots (two wrap-arounds, terminals) every column is the same."""
    eager, _ = scripted(capacity=40, device=device)
    compiled, _ = scripted(capacity=40, device=device, compile_writes=True)
    assert compiled._compiled_write is not None and eager._compiled_write is None
    assert compiled.t == eager.t == STEPS
    for name in ("frames", "actions", "rewards", "dones", "firsts"):
        a, b = getattr(eager, name), getattr(compiled, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
