"""Hashes of what a Procgen build gives, per game and setting: the fixture `tests/test_procgen_pixels.py` checks.

For each of the 16 games and each of three settings (`SETTINGS`: the paper's, unlimited hard levels, 200 easy levels
from 1000), 4 envs with ``rand_seed`` 1234 are stepped with seeded random actions; the SHA-256 of every frame, of
every reward, of every episode start (``first``) and of the emulator states at the end is recorded after `SHORT` and
after `LONG` vector steps. Made once from procgen 0.10.7's original build (the wheel for Python <= 3.10, Qt 5.13.2
statically linked) with Python 3.10, so that any other build or backend can be compared with it bit for bit:

    python3.10 -m venv /tmp/pg310 && /tmp/pg310/bin/pip install procgen==0.10.7
    /tmp/pg310/bin/python tools/procgen_fixture.py --out tests/data/procgen_0.10.7_original.json

Only numpy and procgen are imported (not driml_pl, whose env imports torch), so the recording interpreter needs
nothing else. `hash_run` is also what the test calls, with driml_pl's own env (`driml_pl.envs.make_env`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot", "heist",
         "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")  # fmt: skip
SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {"num_levels": 500, "start_level": 0, "distribution_mode": "easy", "use_sequential_levels": True,
              "paint_vel_info": True},  # spec §5.1
    "hard": {"num_levels": 0, "start_level": 0, "distribution_mode": "hard", "use_sequential_levels": False,
             "paint_vel_info": False},
    "levels200": {"num_levels": 200, "start_level": 1000, "distribution_mode": "easy", "use_sequential_levels": False,
                  "paint_vel_info": False},
}  # fmt: skip
NUM_ENVS, RAND_SEED, SHORT, LONG = 4, 1234, 250, 1000


class Stepper:
    """What `hash_run` needs of an env: ``act``, ``observe_step`` and the states (as a `driml_pl.types.VecEnv`)."""

    def act(self, actions: np.ndarray) -> None: ...
    def observe_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def get_state(self) -> list[bytes]: ...
    def close(self) -> None: ...


class Gym3Stepper(Stepper):
    """procgen's own `ProcgenGym3Env` with the options driml_pl's backend passes (one stepping thread)."""

    def __init__(self, game: str, setting: dict[str, Any]) -> None:
        from procgen import ProcgenGym3Env

        self.env = ProcgenGym3Env(num=NUM_ENVS, env_name=game, rand_seed=RAND_SEED, num_threads=1, **setting)

    def act(self, actions: np.ndarray) -> None:
        self.env.act(np.asarray(actions, dtype=np.int32))

    def observe_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reward, obs, first = self.env.observe()
        return np.asarray(reward, dtype=np.float32), np.asarray(obs["rgb"]), np.asarray(first, dtype=bool)

    def get_state(self) -> list[bytes]:
        return list(self.env.callmethod("get_state"))

    def close(self) -> None:
        self.env.close()


def actions_for(game: str, setting: str, steps: int) -> np.ndarray:
    """The seeded random actions of one (game, setting): (steps, NUM_ENVS) of the 15 Procgen actions."""
    seed = [GAMES.index(game), list(SETTINGS).index(setting)]
    return np.random.default_rng(seed).integers(0, 15, size=(steps, NUM_ENVS))


def hash_run(env: Stepper, game: str, setting: str, steps: int = LONG) -> dict[str, dict[str, str]]:
    """``{str(n): {"frames", "rewards", "firsts", "states"}}`` digests after n = SHORT and n = ``steps`` steps (the
    first observation's frame included in "frames")."""
    hashes = {key: hashlib.sha256() for key in ("frames", "rewards", "firsts")}
    _, frames, firsts = env.observe_step()
    hashes["frames"].update(np.ascontiguousarray(frames).tobytes())
    hashes["firsts"].update(firsts.tobytes())
    out: dict[str, dict[str, str]] = {}
    for i, actions in enumerate(actions_for(game, setting, steps), start=1):
        env.act(actions)
        reward, frames, firsts = env.observe_step()
        hashes["frames"].update(np.ascontiguousarray(frames).tobytes())
        hashes["rewards"].update(np.asarray(reward, dtype=np.float32).tobytes())
        hashes["firsts"].update(np.asarray(firsts, dtype=bool).tobytes())
        if i in (SHORT, steps):
            states = hashlib.sha256(b"".join(env.get_state())).hexdigest()
            out[str(i)] = {**{k: h.hexdigest() for k, h in hashes.items()}, "states": states}
    return out


def record(make: Callable[[str, dict[str, Any]], Stepper], steps: int = LONG) -> dict[str, Any]:
    cells = {}
    for game in GAMES:
        for name, setting in SETTINGS.items():
            env = make(game, setting)
            try:
                cells[f"{game}/{name}"] = hash_run(env, game, name, steps)
            finally:
                env.close()
            print(f"{game}/{name}", file=sys.stderr, flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from importlib.metadata import distributions

    installed = {d.metadata["Name"]: d.version for d in distributions() if "procgen" in d.metadata["Name"].lower()}
    blob = {
        "made_with": {"python": platform.python_version(), "packages": installed, "machine": platform.machine()},
        "num_envs": NUM_ENVS, "rand_seed": RAND_SEED, "settings": SETTINGS, "steps": [SHORT, LONG],
        "cells": record(Gym3Stepper),
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(blob, f, indent=1, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
