"""Vectorised Procgen through gym3 (`ProcgenGym3Env`), stepped in the main process (its binary: `procgen_build`)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import numpy as np

GAMES: tuple[str, ...] = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip
NUM_ACTIONS = 15  # Procgen always exposes the full 15-action keyboard
FRAME_SHAPE = (64, 64, 3)  # native Procgen observation, HWC uint8
DISTRIBUTION_MODES = ("easy", "hard", "extreme", "memory", "exploration")


@dataclass
class EnvConfig:
    """Procgen settings (spec §5.1: the paper uses 32 envs on 500 sequential easy levels with velocity paint).

    Args:
        game: one of the 16 Procgen games.
        num_envs: environments stepped in lockstep on each rank (paper: 32).
        num_levels: number of level seeds an episode may start from; 0 means unlimited (paper: 500).
        start_level: first level seed (paper: 0).
        distribution_mode: Procgen difficulty (paper: easy).
        use_sequential_levels: finishing a level continues the episode on the next seed (paper: true, spec §5.2).
        paint_vel_info: paint velocity bars into the frame (paper: true).
        num_threads: Procgen's stepping threads for these envs; null (the default): as many as the run's torch
            threads, at most 4 (Procgen's own default) and at most num_envs (`driml_pl.threads`).
        build: the Procgen binary (`driml_pl.procgen_build`): ``original`` (default), procgen 0.10.7's original
            build, the paper's pixels on every Python (fetched once where pip installs another); ``installed``, the
            installed ``procgen`` module's own (on Python 3.11/3.12 procgen-mirror, whose frames differ in 6 games).
    """

    game: str = "bigfish"
    num_envs: int = 32
    num_levels: int = 500
    start_level: int = 0
    distribution_mode: str = "easy"
    use_sequential_levels: bool = True
    paint_vel_info: bool = True
    num_threads: int | None = None
    build: str = "original"

    def __post_init__(self) -> None:
        if self.game not in GAMES:
            raise ValueError(f"unknown game {self.game!r} (env.game); valid games: {', '.join(GAMES)}")
        if self.distribution_mode not in DISTRIBUTION_MODES:
            raise ValueError(
                f"unknown distribution_mode {self.distribution_mode!r}; valid: {', '.join(DISTRIBUTION_MODES)}"
            )
        if self.num_envs < 1:
            raise ValueError(f"env.num_envs must be >= 1, got {self.num_envs}")
        if self.num_levels < 0 or self.start_level < 0:
            raise ValueError("env.num_levels and env.start_level must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"env.num_threads must be >= 1 or null, got {self.num_threads}")
        from driml_pl.procgen_build import BUILDS

        if self.build not in BUILDS:
            raise ValueError(f"data.env.build={self.build!r} is not allowed; valid: {', '.join(BUILDS)}")


class ProcgenVecEnv:
    """A batch of Procgen games with a reset-free, gym3-style interface.

    `step(actions)` returns ``(reward, next_frame, first)`` where ``first[i]`` says that ``next_frame[i]`` is the first
    frame of a new episode: the action ended env ``i``'s episode and Procgen already reset it (the terminal frame is
    never shown). Time-limit ends are reported the same way; Procgen does not tell them apart.
    """

    def __init__(self, config: EnvConfig, rand_seed: int) -> None:
        import procgen
        from procgen import ProcgenGym3Env  # imported late: importing procgen loads its native library

        from driml_pl.procgen_build import library_dir, loading_from
        from driml_pl.threads import procgen_threads

        # gym3 builds each env inside cffi's dlopen; a garbage collection there that finalises an unreferenced old
        # env deadlocks on cffi's lock (seen in the test suite). Collect such envs first, outside dlopen.
        gc.collect()
        self.config = config
        self.num_envs = config.num_envs
        assets = os.path.join(os.path.dirname(procgen.__file__), "data", "assets") + os.sep  # the original's
        with loading_from(library_dir(config.build)):
            self._env = ProcgenGym3Env(
                num=config.num_envs,
                env_name=config.game,
                num_levels=config.num_levels,
                start_level=config.start_level,
                distribution_mode=config.distribution_mode,
                use_sequential_levels=config.use_sequential_levels,
                paint_vel_info=config.paint_vel_info,
                rand_seed=int(rand_seed),
                num_threads=procgen_threads(config.num_threads, config.num_envs),
                resource_root=assets,
            )

    def observe(self) -> np.ndarray:
        """The current frames, (N, 64, 64, 3) uint8."""
        _, obs, _ = self._env.observe()
        return np.asarray(obs["rgb"])

    def act(self, actions: np.ndarray) -> None:
        """Start a step: Procgen steps the games in its own threads and returns at once."""
        self._env.act(np.asarray(actions, dtype=np.int32))

    def observe_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for the step started by `act`; ``(reward, next_frame, first)``."""
        reward, obs, first = self._env.observe()
        return np.asarray(reward, dtype=np.float32), np.asarray(obs["rgb"]), np.asarray(first, dtype=bool)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.act(actions)
        return self.observe_step()

    def level_seeds(self) -> np.ndarray:
        """The level seed each env is playing now, as Procgen reports it: (N,) int64."""
        return np.array([int(info["level_seed"]) for info in self._env.get_info()], dtype=np.int64)

    def get_state(self) -> list[bytes]:
        """Serialised emulator state of every env (Procgen's own `get_state`), for checkpoints."""
        return list(self._env.callmethod("get_state"))

    def set_state(self, states: list[bytes]) -> None:
        if len(states) != self.num_envs:
            raise ValueError(f"saved env state has {len(states)} envs, this run has env.num_envs={self.num_envs}")
        self._env.callmethod("set_state", states)

    def close(self) -> None:
        self._env.close()


def rank_seeds(seed: int, rank: int) -> tuple[int, np.random.Generator]:
    """Procgen's `rand_seed` and the numpy generator for one rank, both derived from the run seed.

    Different ranks get independent streams; two runs with one seed and one rank see the same levels.
    """
    seq = np.random.SeedSequence([seed, rank])
    env_seq, rng_seq = seq.spawn(2)
    return int(env_seq.generate_state(1)[0] & 0x7FFFFFFF), np.random.default_rng(rng_seq)
