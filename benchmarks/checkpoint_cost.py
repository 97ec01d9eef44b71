"""Cost of the checkpoint unit's replay persistence at two replay sizes, measured side by side in one run.

For each size: a replay of 32 envs filled with random frames (wrapped once) and persisted in full (a run's first
checkpoint), then ``--new`` transitions are added and one checkpoint is timed: it writes only the new slots, so its
seconds and bytes should not grow with the replay. Then a fresh process allocates the replay and resumes it from the
segments: seconds, and the peak resident memory the resume adds (over the interpreter's, torch's and numpy's) divided
by the replay's own bytes (the goal is at most 1.1; a full second copy would be 2).

Usage: python benchmarks/checkpoint_cost.py [--sizes 100000 400000] [--new 10240] [--dir /tmp/...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from driml_pl.checkpoint import read_segments, write_segment
from driml_pl.data.replay import FrameReplay

ENVS = 32


def filled(capacity: int, steps: int) -> FrameReplay:
    replay = FrameReplay(ENVS, capacity, n_step=7, gamma=0.99, max_k=2)
    gen = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 256, (ENVS, 64, 64, 3), dtype=torch.uint8, generator=gen)
    replay.reset(frame)
    zeros, rewards = torch.zeros(ENVS), torch.rand(ENVS, generator=gen)
    for t in range(steps):
        replay.add(zeros, rewards, torch.zeros(ENVS, dtype=torch.bool), frame.roll(t, dims=1))
    return replay


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _status(field: str) -> int:
    """A /proc/self/status memory figure in bytes: VmRSS (now) or VmHWM (peak of this program; unlike ru_maxrss it
    does not carry over the parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def resume(capacity: int, root: Path, segments: list, t: int) -> dict:
    """In this (fresh) process: allocate the replay, read the segments into it."""
    baseline = _status("VmRSS")  # the interpreter, torch and numpy
    start = time.perf_counter()
    replay = FrameReplay(ENVS, capacity, n_step=7, gamma=0.99, max_k=2)
    read_segments(replay, root, segments, t)
    seconds = time.perf_counter() - start
    replay_bytes = sum(x.numel() * x.element_size() for x in (replay.frames, replay.actions, replay.rewards,
                                                              replay.dones, replay.firsts))  # fmt: skip
    peak = _status("VmHWM")
    return {"resume_s": seconds, "replay_bytes": replay_bytes, "peak_rss_bytes": peak - baseline}


def measure(size: int, new: int, workdir: Path) -> dict:
    capacity = size // ENVS
    steps_new = new // ENVS
    replay = filled(capacity, capacity + capacity // 3)  # wrapped: the ring's slots are not in time order
    root = workdir / f"replay{size}"
    root.mkdir(parents=True)
    start = time.perf_counter()
    first = [write_segment(replay, root, 0, replay.t)]  # a first checkpoint writes what the ring holds
    full_s = time.perf_counter() - start
    full_bytes = du(root)
    t0 = replay.t
    gen = torch.Generator().manual_seed(1)
    frame = torch.randint(0, 256, (ENVS, 64, 64, 3), dtype=torch.uint8, generator=gen)
    for _ in range(steps_new):
        replay.add(torch.zeros(ENVS), torch.zeros(ENVS), torch.zeros(ENVS, dtype=torch.bool), frame)
    start = time.perf_counter()
    segment = write_segment(replay, root, t0 + 1, replay.t)
    incremental_s = time.perf_counter() - start
    incremental_bytes = du(root / segment["name"])
    segments = [s for s in [*first, segment] if s["last"] >= replay.t - capacity + 1]
    state = {"capacity": capacity, "root": str(root), "segments": segments, "t": replay.t}
    del replay
    cmd = [sys.executable, __file__, "--resume-json", json.dumps(state)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "transitions": size,
        "replay_gb": resumed["replay_bytes"] / 1e9,
        "full_checkpoint_s": full_s,
        "full_checkpoint_gb": full_bytes / 1e9,
        "new_transitions": steps_new * ENVS,
        "checkpoint_s": incremental_s,
        "checkpoint_mb": incremental_bytes / 1e6,
        "resume_s": resumed["resume_s"],
        "resume_peak_over_replay": resumed["peak_rss_bytes"] / resumed["replay_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--new", type=int, default=10_240, help="transitions added between the two checkpoints")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--resume-json", help=argparse.SUPPRESS)  # the fresh process that measures a resume
    args = parser.parse_args()
    if args.resume_json:
        state = json.loads(args.resume_json)
        state["root"] = Path(state["root"])
        print(json.dumps(resume(**state)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="driml_ckpt_", dir=args.dir))
    try:
        rows = [measure(size, args.new, workdir) for size in args.sizes]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n| replay (transitions, GB) | first checkpoint (s, GB) | checkpoint of the new transitions (s, MB) "
          "| resume (s) | resume: added peak RSS / replay |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['transitions']:,} ({r['replay_gb']:.2f} GB) | {r['full_checkpoint_s']:.2f} s, "
              f"{r['full_checkpoint_gb']:.2f} GB | {r['checkpoint_s']:.3f} s, {r['checkpoint_mb']:.0f} MB for "
              f"{r['new_transitions']:,} | {r['resume_s']:.2f} | {r['resume_peak_over_replay']:.3f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
