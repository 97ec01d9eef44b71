"""Host time of each part of the data path, one at a time (the paper's sizes): where a null learner's 0.8 ms (CPU)
or 3.7 ms (the lent H100 VM) per update goes.

Parts: the replay upload and write of one vector step (eager, and compiled as ``data.compile_sampling`` does);
anchor, horizon and gather sampling of a minibatch of 256 (eager, and with the gather compiled as
``data.compile_sampling`` does); the actors' forward pass on 32 frames with its
device -> host copy (op by op, and captured as ``model.cuda_graphs`` does on a GPU); the snapshot copy; Procgen
stepping 32 envs with 4, 8 and 16 threads; and the dispatch cost of 100 tiny tensor operations, as a yardstick of
per-op host overhead.

Usage: python benchmarks/data_path.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from driml_pl.data.replay import FrameReplay
from driml_pl.horizon import Horizon
from driml_pl.learner import DRIML


def timed(name: str, fn: Callable[[], object], device: str, n: int = 200) -> None:
    for _ in range(10):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"| {name} | {(time.perf_counter() - start) / n * 1e3:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    device = parser.parse_args().device
    # compile in this process: inductor's pool of compile workers would keep warming up in the background for
    # seconds after a compile, taking this machine's 2 cores from the timings that follow
    torch._inductor.config.compile_threads = 1
    replay = FrameReplay(32, 31_250, n_step=7, gamma=0.99, max_k=2, device=device)
    frames = np.random.default_rng(0).integers(0, 255, (32, 64, 64, 3), dtype=np.uint8)
    actions, rewards, dones = np.zeros(32, np.int64), np.zeros(32, np.float32), np.zeros(32, bool)
    replay.reset(frames)
    for _ in range(500):
        replay.add(actions, rewards, dones, frames)
    gen = torch.Generator(device=device).manual_seed(0)
    horizon = Horizon("random", 2)

    def sample() -> object:
        env, t = replay.sample_anchors(gen, 256)
        return replay.gather(env, t, horizon.sample(gen, 256), check=False)

    model = DRIML().to(device)
    model.acting.refresh()
    print(f"\n{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}\n")
    print("| part | ms per call |\n|---|---|")
    timed("replay.add: one vector step of 32 frames", lambda: replay.add(actions, rewards, dones, frames), device)
    replay.compile_writes = True  # data.compile_sampling: the same write through torch.compile
    replay.add(actions, rewards, dones, frames)  # compiles
    timed("replay.add, compiled write: one vector step", lambda: replay.add(actions, rewards, dones, frames), device)
    replay.compile_writes = False
    timed("sample + gather: minibatch of 256", sample, device)
    replay.compile_gather = True  # data.compile_sampling: the same gather through torch.compile
    sample()  # compiles
    timed("sample + gather, compiled gather: minibatch of 256", sample, device)
    replay.compile_gather = False
    timed("acting.act: 32 frames, with the device -> host copy", lambda: model.acting.act(replay.latest()), device)
    graphed = DRIML(cuda_graphs=True).to(device)  # the acting forward as a CUDA graph (op by op on the CPU)
    graphed.acting.refresh()
    timed("acting.act, model.cuda_graphs: captured forward", lambda: graphed.acting.act(replay.latest()), device)
    timed("acting.refresh: the snapshot copy", model.acting.refresh, device)
    zero = torch.zeros((), device=device)
    timed("100 tiny tensor additions (dispatch yardstick)", lambda: [zero + 1 for _ in range(100)], device, n=20)
    from procgen import ProcgenGym3Env

    for threads in (4, 8, 16):
        env = ProcgenGym3Env(num=32, env_name="bigfish", num_levels=500, use_sequential_levels=True,
                             distribution_mode="easy", rand_seed=1, num_threads=threads)  # fmt: skip
        act = np.zeros(32, dtype=np.int32)
        step = lambda env=env, act=act: (env.act(act), env.observe())  # noqa: E731
        timed(f"Procgen: 32 envs stepped, {threads} threads", step, device, n=300)
        env.close()


if __name__ == "__main__":
    main()
