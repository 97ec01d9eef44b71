"""Host-dispatched tensor operations per update, per configuration: a CPU-measurable proxy of the host's work on a GPU.

On the lent GPU VM every tensor operation the host dispatches costs it tens of microseconds (Python, the dispatcher,
the kernel launch), whatever the kernel's size, so the count per update bounds the update rate the host can feed. A
real ``fit`` (DRIML-randk, lambda_GG = 1, bigfish, 8 envs, batch 32, ratio 4: one vector step per update, 7 updates
per Lightning step, as the paper's schedule) runs with a dispatch counter around the data path
(`ReplayStream.next_batches`) and the update (`DRIML.update`), from its second Lightning step on (the first data
call also fills the replay up to ``learning_starts``). Each call of a compiled region or a `StepGraph` counts
as one operation, as its replay is one launch on a GPU (inductor's CPU code in between is not dispatched), and so
does the backward of the compiled loss (one CUDA-graph replay under ``reduce-overhead``). So the counts are what a
GPU host would dispatch, the same on every machine, but for the replay's uploads: on a GPU they go through pinned
staging buffers, about 4 more operations per vector step than this CPU path. Not counted: Lightning's loop and the
Python between operations.

Usage: python benchmarks/host_ops.py
"""

from __future__ import annotations

import collections
import contextlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import driml_pl.learner.graphs
from driml_pl.data import DRIMLDataModule, ReplayStream
from driml_pl.envs import EnvConfig
from driml_pl.learner import DRIML

UPDATES = 140
PER_STEP = 7  # data.updates_per_batch
CONFIGS = {  # name: (model.compile, model.cuda_graphs, data.compile_sampling)
    "op by op (eager)": (False, False, False),
    "model.compile (the paper configs)": (True, False, False),
    "+ data.compile_sampling": (True, False, True),
    "model.cuda_graphs (+ compile)": (True, True, False),
    "model.cuda_graphs + data.compile_sampling": (True, True, True),
}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


class _Probe:
    """Counts the operations dispatched inside the wrapped methods; a compiled region or a step graph counts as one."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = collections.Counter()
        self.calls: dict[str, int] = collections.Counter()
        self._active: _Counter | None = None
        self.started = False

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        """Inside: one operation, nothing under it counted (its own dispatch mode cannot run under a compile)."""
        if self._active is None:
            yield
            return
        self._active.ops += 1
        with _disable_current_modes():
            yield

    def wrap(self, owner: type, name: str, key: str) -> Callable[[], None]:
        original = getattr(owner, name)
        probe = self

        def counted(self_: Any, *args: Any, **kwargs: Any) -> Any:
            counter = _Counter()
            probe._active = counter
            try:
                with counter:
                    return original(self_, *args, **kwargs)
            finally:
                probe._active = None
                if probe.started:
                    probe.counts[key] += counter.ops
                    probe.calls[key] += 1
                probe.started |= key == "data"  # the first data call holds the replay's warm-up fill: not counted

        setattr(owner, name, counted)
        return lambda: setattr(owner, name, original)


def _fit(compile_: bool, graphs: bool, sampling: bool, probe: _Probe, log_dir: str) -> None:
    data = DRIMLDataModule(env=EnvConfig(game="bigfish", num_envs=8), total_env_steps=1000 + 8 * (UPDATES + 8),
                           replay_size=20_000, batch_size=32, replay_ratio=4.0, learning_starts=1000,
                           updates_per_epoch=UPDATES + PER_STEP, updates_per_batch=PER_STEP,
                           compile_sampling=sampling)  # fmt: skip
    model = DRIML(lambda_gg=1.0, obs_size=(64, 64), compile=compile_, cuda_graphs=graphs)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=UPDATES, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         log_every_n_steps=100)  # fmt: skip
    trainer.fit(model, datamodule=data)


def main() -> None:
    pl.seed_everything(0, verbose=False)
    torch._dynamo.config.cache_size_limit = 64
    probe = _Probe()
    compile_ = torch.compile

    def compiled(fn: Any, *args: Any, **kwargs: Any) -> Any:
        inner = compile_(fn, *args, **kwargs)

        def call(*a: Any, **k: Any) -> Any:
            with probe.region():
                return inner(*a, **k)

        return call

    graph_call = driml_pl.learner.graphs.StepGraph.__call__

    def step_graph(self: Any) -> Any:
        with probe.region():
            return graph_call(self)

    backward = DRIML.manual_backward

    def manual_backward(self: DRIML, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        # with model.compile the backward is the compiled region's own (one CUDA-graph replay on a GPU), so it counts
        # as one; here on the CPU it would dispatch the convolution and matmul backward kernels one by one
        with probe.region() if self._compile else contextlib.nullcontext():
            backward(self, loss, *args, **kwargs)

    torch.compile = compiled  # type: ignore[assignment]
    driml_pl.learner.graphs.StepGraph.__call__ = step_graph
    DRIML.manual_backward = manual_backward
    undo = [probe.wrap(ReplayStream, "next_batches", "data"), probe.wrap(DRIML, "update", "update")]
    rows = []
    log_dir = tempfile.mkdtemp(prefix="driml_ops_")
    for name, (c, g, s) in CONFIGS.items():
        probe.counts.clear()
        probe.calls.clear()
        probe.started = False
        _fit(c, g, s, probe, log_dir)
        # each data call hands out one Lightning step's PER_STEP minibatches
        data = probe.counts["data"] / (PER_STEP * probe.calls["data"])
        update = probe.counts["update"] / probe.calls["update"]
        rows.append((name, data, update))
    for restore in undo:
        restore()
    torch.compile, DRIML.manual_backward = compile_, backward
    driml_pl.learner.graphs.StepGraph.__call__ = graph_call
    print(f"\n## Host-dispatched tensor operations per update ({UPDATES} updates, torch {torch.__version__})\n")
    print("| configuration | data path | update | total |\n|---|---|---|---|")
    for name, data, update in rows:
        print(f"| {name} | {data:.1f} | {update:.1f} | {data + update:.1f} |")


if __name__ == "__main__":
    main()
