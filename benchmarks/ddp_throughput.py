"""Updates/s and env steps/s of a real ``fit`` through the CLI on 1 vs N ranks at the same global settings.

Every config value is global (issue 8): the same global batch, envs, replay and budget, split over the ranks, so
the runs make the same number of updates on the same number of env steps; only the wall time differs. On the CPU the
ranks are gloo processes (``--trainer.strategy ddp``); ``--accelerator gpu`` compares 1 vs N GPUs on a machine with
several. Rates are rank 0's ``perf/updates_per_s`` and ``perf/env_steps_per_s`` (global counts) over the logging
intervals after the first ``--skip`` (start-up), combined as total work over total time (a harmonic mean).

Usage: python benchmarks/ddp_throughput.py [--ranks 1 2] [--batch 32] [--num-envs 16] [--updates 160]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """One fit; returns its steady rates and wall time."""
    run_dir = root / f"ranks{ranks}"
    budget = args.learning_starts + int(args.updates * args.batch // args.replay_ratio)
    overrides = {
        "--config": str(ROOT / "conf" / "quickstart.yaml"),
        "--trainer.default_root_dir": str(run_dir),
        "--trainer.accelerator": args.accelerator,
        "--trainer.devices": str(ranks),
        "--trainer.strategy": "ddp" if ranks > 1 else "auto",
        "--trainer.enable_progress_bar": "false",
        "--trainer.enable_model_summary": "false",
        "--trainer.log_every_n_steps": str(args.log_every),
        "--data.env.game": "bigfish",
        "--data.env.num_envs": str(args.num_envs),
        "--data.total_env_steps": str(budget),
        "--data.replay_size": str(args.replay_size),
        "--data.batch_size": str(args.batch),
        "--data.replay_ratio": str(args.replay_ratio),
        "--data.learning_starts": str(args.learning_starts),
        "--data.updates_per_batch": str(args.per_step),
        "--data.updates_per_epoch": str(args.updates * 10),
        "--data.eval_every_env_steps": "0",
    }
    cmd = [sys.executable, "-m", "driml_pl", "fit", *[x for kv in overrides.items() for x in kv]]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{ranks}-rank run failed:\n{proc.stderr[-3000:]}")
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/updates_per_s")]
    rows = rows[args.skip :]
    if not rows:
        raise SystemExit(f"{ranks}-rank run logged too few intervals; raise --updates")
    updates = len(rows) / sum(1 / float(r["perf/updates_per_s"]) for r in rows)
    env_steps = len(rows) / sum(1 / float(r["perf/env_steps_per_s"]) for r in rows)
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        steps = max(float(r["rollout/env_steps"]) for r in csv.DictReader(f) if r.get("rollout/env_steps"))
    return {"updates_per_s": updates, "env_steps_per_s": env_steps, "wall_s": wall, "env_steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--num-envs", type=int, default=16, help="global envs")
    parser.add_argument("--replay-ratio", type=float, default=4.0)
    parser.add_argument("--replay-size", type=int, default=20_000, help="global replay")
    parser.add_argument("--learning-starts", type=int, default=1024)
    parser.add_argument("--updates", type=int, default=160)
    parser.add_argument("--per-step", type=int, default=1, help="updates per Lightning step")
    parser.add_argument("--log-every", type=int, default=10, help="Lightning steps per logging interval")
    parser.add_argument("--skip", type=int, default=2, help="logging intervals left out at the start")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, args, Path(tmp)) for n in args.ranks}
    print(f"\nDDP throughput: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"accelerator {args.accelerator}; global batch {args.batch}, {args.num_envs} envs, replay ratio "
          f"{args.replay_ratio:g}, {args.updates} updates, {args.per_step} update(s) per step")  # fmt: skip
    columns = ("ranks", 5), ("updates/s", 9), ("env steps/s", 11), ("speed-up", 8), ("env steps", 9), ("wall s", 6)
    header = " | ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    base = results[args.ranks[0]]["updates_per_s"]
    for n, r in results.items():
        print(f"{n:>5} | {r['updates_per_s']:9.2f} | {r['env_steps_per_s']:11.1f} | {r['updates_per_s'] / base:7.2f}x "
              f"| {r['env_steps']:9.0f} | {r['wall_s']:6.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
