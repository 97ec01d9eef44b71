"""The environment seam: `EnvConfig`, and the backend that makes its `driml_pl.types.VecEnv`.

A backend is one module of this package with ``SPEC`` (a `driml_pl.types.EnvSpec`: the frame shape and the action
layout the replay, the evaluation and the Q-head take) and ``make(config, rand_seed) -> VecEnv``; `BACKENDS` names
them and ``data.env.backend`` picks one. There is one today, ``procgen``: Procgen's C library through cffi
(`driml_pl.envs.procgen`), which needs neither the procgen Python module nor gym. Envs are stepped in the main
process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from driml_pl.types import EnvSpec, VecEnv

GAMES: tuple[str, ...] = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip
DISTRIBUTION_MODES = ("easy", "hard", "extreme", "memory", "exploration")
BACKENDS = {"procgen": "driml_pl.envs.procgen"}  # data.env.backend -> the module that implements it


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
        backend: which module of `driml_pl.envs` steps the envs (`BACKENDS`): ``procgen`` (Procgen's C library
            through cffi).
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
    backend: str = "procgen"

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
        if self.backend not in BACKENDS:
            raise ValueError(f"data.env.backend={self.backend!r} is not allowed; valid: {', '.join(BACKENDS)}")


def spec(config: EnvConfig | None = None) -> EnvSpec:
    """The frame shape and action layout of ``config``'s backend (the default backend's without a config)."""
    return importlib.import_module(BACKENDS[config.backend if config else "procgen"]).SPEC


NUM_ACTIONS = spec().num_actions  # the default backend's: Procgen's full 15-action keyboard


def make_env(config: EnvConfig, rand_seed: int) -> VecEnv:
    """``config.num_envs`` envs of ``config``'s backend, seeded by ``rand_seed``."""
    return importlib.import_module(BACKENDS[config.backend]).make(config, rand_seed)


def rank_seeds(seed: int, rank: int) -> tuple[int, np.random.Generator]:
    """Procgen's `rand_seed` and the numpy generator for one rank, both derived from the run seed.

    Different ranks get independent streams; two runs with one seed and one rank see the same levels.
    """
    seq = np.random.SeedSequence([seed, rank])
    env_seq, rng_seq = seq.spawn(2)
    return int(env_seq.generate_state(1)[0] & 0x7FFFFFFF), np.random.default_rng(rng_seq)
