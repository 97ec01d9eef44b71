"""Resident memory per stored transition of the frame replay, measured by filling it with real Procgen frames.

Usage: python benchmarks/replay_memory.py [--transitions 200000]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from driml_pl.data.replay import FrameReplay
from driml_pl.envs import EnvConfig, make_env


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transitions", type=int, default=200_000)
    args = parser.parse_args()
    num_envs = 32
    env = make_env(EnvConfig(game="bigfish", num_envs=num_envs), rand_seed=0)
    rng = np.random.default_rng(0)
    before = rss_bytes()
    capacity = args.transitions // num_envs
    replay = FrameReplay(num_envs, capacity, n_step=7, gamma=0.99, max_k=2)
    replay.reset(env.observe())
    for _ in range(capacity):  # fill every slot once
        actions = rng.integers(0, 15, size=num_envs)
        rewards, frames, firsts = env.step(actions)
        replay.add(actions, rewards, firsts, frames)
    peak = rss_bytes()
    stored = num_envs * capacity
    print(
        json.dumps(
            {
                "transitions": stored,
                "array_bytes_per_transition": replay.bytes_per_transition,
                "rss_bytes_per_transition": round((peak - before) / stored, 1),
                "paper_replay_1M_GB": round(replay.bytes_per_transition * 1e6 / 1e9, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
