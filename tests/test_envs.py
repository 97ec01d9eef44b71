"""Real Procgen: seeding, the game list, and emulator state round trips."""

from __future__ import annotations

import numpy as np
import pytest

from driml_pl.envs import GAMES, EnvConfig, make_env, rank_seeds
from driml_pl.types import EnvSpec, VecEnv


def rollout(env: VecEnv, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames, rewards, firsts = [env.observe()], [], []
    for _ in range(steps):
        r, f, first = env.step(rng.integers(0, 15, size=env.num_envs))
        frames.append(f)
        rewards.append(r)
        firsts.append(first)
    return np.stack(frames), np.stack(rewards), np.stack(firsts)


def test_sixteen_games_and_unknown_game_error_lists_them():
    assert len(GAMES) == 16 and "bigfish" in GAMES and "starpilot" in GAMES
    with pytest.raises(ValueError, match="unknown game 'pacman'.*bigfish, bossfight"):
        EnvConfig(game="pacman")
    with pytest.raises(ValueError, match="distribution_mode"):
        EnvConfig(distribution_mode="medium")


def test_same_seed_same_levels_and_ranks_differ():
    cfg = EnvConfig(game="bigfish", num_envs=3, num_levels=500)
    seed0, _ = rank_seeds(7, 0)
    a = rollout(make_env(cfg, seed0), 60)
    b = rollout(make_env(cfg, seed0), 60)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    seed1, _ = rank_seeds(7, 1)
    assert seed1 != seed0
    c = rollout(make_env(cfg, seed1), 5)
    assert not np.array_equal(a[0][:6], c[0])


def test_terminal_step_returns_next_episodes_first_frame():
    env = make_env(EnvConfig(game="bigfish", num_envs=4, num_levels=500), 3)
    frames, rewards, firsts = rollout(env, 400)
    assert firsts.any(), "random bigfish agents die within 400 steps"
    assert rewards.dtype == np.float32 and frames.dtype == np.uint8 and frames.shape[1:] == (4, 64, 64, 3)


def test_state_round_trip_continues_identically():
    cfg = EnvConfig(game="coinrun", num_envs=2, num_levels=50)
    env = make_env(cfg, 11)
    rollout(env, 30)
    saved = env.get_state()
    after = rollout(env, 40, seed=5)
    other = make_env(cfg, 999)
    other.set_state(saved)
    again = rollout(other, 40, seed=5)
    for x, y in zip(after, again, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="num_envs"):
        make_env(EnvConfig(game="coinrun", num_envs=3), 0).set_state(saved)


def test_level_seeds_and_the_exploration_mode_are_procgens():
    # exploration: hard levels, one fixed level per game that has one (procgen's own table); others are refused
    env = make_env(EnvConfig(game="maze", num_envs=2, distribution_mode="exploration"), 0)
    assert env.level_seeds().tolist() == [158988835, 158988835]
    env.close()
    with pytest.raises(ValueError, match="bigfish has no exploration level; games that do: coinrun, caveflyer"):
        make_env(EnvConfig(game="bigfish", num_envs=2, distribution_mode="exploration"), 0)


class _TinyEnv:
    """A backend of 2x2 single-channel frames and 3 actions: what the seam needs, nothing of Procgen."""

    def __init__(self, config: EnvConfig, rand_seed: int) -> None:
        self.num_envs, self.t = config.num_envs, 0
        self.spec = SPEC_TINY

    def observe(self) -> np.ndarray:
        return np.full((self.num_envs, *self.spec.frame_shape), self.t, dtype=np.uint8)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.t += 1
        return np.ones(self.num_envs, np.float32), self.observe(), np.zeros(self.num_envs, bool)


SPEC_TINY = EnvSpec(frame_shape=(2, 2, 1), actions=("a", "b", "c"))


def test_a_backend_is_one_module_and_the_replay_takes_its_frame_shape(monkeypatch):
    import sys
    import types

    from driml_pl import envs
    from driml_pl.data.replay import FrameReplay, replay_bytes

    module = types.ModuleType("tiny_backend")
    module.SPEC, module.make = SPEC_TINY, _TinyEnv  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiny_backend", module)
    monkeypatch.setitem(envs.BACKENDS, "tiny", "tiny_backend")
    config = EnvConfig(backend="tiny", num_envs=2)
    assert envs.spec(config) == SPEC_TINY and envs.spec(config).num_actions == 3
    env = make_env(config, 0)
    assert isinstance(env, _TinyEnv)
    replay = FrameReplay(2, 16, n_step=1, gamma=0.9, max_k=1, frame_shape=env.spec.frame_shape)
    assert replay.frames.shape == (16, 2, 2, 2, 1)
    assert replay_bytes(16, 2, env.spec.frame_shape) == 16 * 2 * (4 + 1 + 4 + 1 + 1)  # frame, action, reward, flags
    assert envs.spec() == EnvSpec((64, 64, 3), envs.spec().actions) and envs.spec().num_actions == 15
    with pytest.raises(ValueError, match=r"data.env.backend='gym3' is not allowed; valid: procgen, tiny"):
        EnvConfig(backend="gym3")


def test_a_library_whose_system_dependency_is_missing_is_refused_in_one_line_naming_it(tmp_path):
    """procgen's libenv.so links glib; a system without it gets the package to install, not cffi's traceback. A real
    library linked against one that is then removed, loaded the way a run loads libenv.so."""
    import shutil
    import subprocess

    from driml_pl.envs.procgen import load_library
    from driml_pl.procgen_build import BuildUnavailable

    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the two stand-in libraries")
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "env.c").write_text("int dep(void);\nint libenv_version(void) { return dep(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "libgthread-2.0.so.0", tmp_path / "dep.c"], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "libenv.so", tmp_path / "env.c",
                    tmp_path / "libgthread-2.0.so.0"], check=True)  # fmt: skip
    (tmp_path / "libgthread-2.0.so.0").unlink()
    with pytest.raises(BuildUnavailable) as refused:
        load_library(str(tmp_path / "libenv.so"))
    assert str(refused.value) == (
        f"Procgen's library {tmp_path / 'libenv.so'} needs libgthread-2.0.so.0, which this system lacks: install glib "
        "(Debian/Ubuntu: apt install libglib2.0-0t64, or libglib2.0-0 before Debian 13 and Ubuntu 24.04)"
    )
