"""Mean episode return of a uniformly random policy on a config's game and levels (the learning baseline).

Usage: python benchmarks/random_policy.py [--config conf/quickstart.yaml] [--env-steps 192000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from driml_pl.envs import NUM_ACTIONS, EnvConfig, make_env, rank_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--env-steps", type=int, default=None, help="default: the config's data.total_env_steps")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    env_config = EnvConfig(**config["data"]["env"])
    budget = args.env_steps or int(config["data"]["total_env_steps"])
    rand_seed, rng = rank_seeds(int(config.get("seed_everything", 0)), 0)
    env = make_env(env_config, rand_seed)
    returns, running = [], np.zeros(env.num_envs)
    for _ in range(budget // env.num_envs):
        rewards, _, firsts = env.step(rng.integers(0, NUM_ACTIONS, size=env.num_envs))
        running += rewards
        returns += running[firsts].tolist()
        running[firsts] = 0.0
    print(
        json.dumps(
            {
                "config": args.config,
                "game": env_config.game,
                "num_levels": env_config.num_levels,
                "env_steps": budget,
                "episodes": len(returns),
                "mean_return": round(float(np.mean(returns)), 3),
                "mean_return_last_100": round(float(np.mean(returns[-100:])), 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
