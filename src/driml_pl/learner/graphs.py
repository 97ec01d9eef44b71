"""Whole-step CUDA graphs (``model.cuda_graphs``): a function of fixed ("static") tensors, run eagerly for its first
few calls, then captured once and replayed.

A replay is one launch from the host, whatever the number of kernels inside, so a step that would cost the host tens
of microseconds per kernel (Python, the dispatcher, the launch) costs it a few microseconds in all. The caller owns
the static tensors: it copies each call's inputs into them, then calls the `StepGraph`, and reads the outputs (the
same tensors every call) before the next call.

The first ``warmup`` calls run the function eagerly on a side stream: they are real calls (the module's first
updates), and they do the lazy work that must not happen inside a capture (the optimizer's state, cuDNN and cuBLAS
set-up, the compiled loss's compilation). The next call captures the function (nothing runs while capturing) and
replays it; every later call replays it. Everything the function reads or writes must keep its storage from then on:
parameters, optimizer state and the static tensors are updated in place, never reassigned.

On the CPU (and on any device without CUDA graphs) the function simply runs at every call. That is the code path
the CPU tests check against the per-op update; only the capture itself needs a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")

# torch.compile modes that leave the CUDA graphs to `StepGraph` (inductor's own cannot be nested in a capture)
GRAPH_COMPILE_MODES = ("auto", "default", "max-autotune-no-cudagraphs")
# trainer.precision values a captured update supports: 16-mixed's gradient scaler reads back every update
GRAPH_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16")


class StepGraph(Generic[T]):
    """Runs ``fn`` (no arguments; it reads and writes static tensors) eagerly, or from its CUDA graph once captured.

    Args:
        fn: the step. Returns its outputs (tensors, or containers of them), the same storage every call once captured.
        device: where it runs; CUDA graphs only on ``cuda``.
        warmup: eager calls before the capture (on a GPU).
        before_capture: called once, right before the capture (e.g. to mark an optimizer capturable).
        what: what the step is, for the error raised when its capture fails.
    """

    def __init__(
        self,
        fn: Callable[[], T],
        device: torch.device,
        warmup: int = 3,
        before_capture: Callable[[], None] | None = None,
        what: str = "the step",
    ) -> None:
        self.fn, self.device, self.warmup, self.before_capture, self.what = fn, device, warmup, before_capture, what
        self.calls = 0
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.output: T | None = None
        self._side: Any = None  # the warm-up stream

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> T:
        if self.device.type != "cuda":
            return self.fn()
        if self.graph is not None:
            self.graph.replay()
            assert self.output is not None
            return self.output
        with _no_autocast_cache():
            if self.calls < self.warmup:
                self.calls += 1
                return self._eager_on_side_stream()
            if self.before_capture is not None:
                self.before_capture()
            graph = torch.cuda.CUDAGraph()
            # captured on the warm-up stream, whose cuBLAS handle and workspace the warm-up created (lazily creating
            # them on another stream mid-capture is what breaks captures; PyTorch's make_graphed_callables does the
            # same); it records the kernels, none of them runs yet
            try:
                with torch.cuda.graph(graph, stream=self._side_stream()):
                    self.output = self.fn()
            except Exception as err:  # no silent fallback: a failed capture may leave the allocator mid-capture
                raise RuntimeError(
                    f"model.cuda_graphs: capturing {self.what} as a CUDA graph failed ({type(err).__name__}: "
                    f"{' '.join(str(err).split())}); run with model.cuda_graphs=false"
                ) from err
        self.graph = graph
        graph.replay()
        return self.output

    def _eager_on_side_stream(self) -> T:
        """One eager call on the side stream, ordered after and before the caller's stream (as PyTorch's guide to
        CUDA graphs warms up): lazily created handles and workspaces are made here, for the capture's stream."""
        side, current = self._side_stream(), torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self.fn()
        current.wait_stream(side)
        return out

    def _side_stream(self) -> Any:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side


def _no_autocast_cache() -> contextlib.AbstractContextManager[Any]:
    """Under autocast (``bf16-mixed``), the same autocast without its cache of cast weights: a capture must not hold
    casts cached by an earlier call (PyTorch's CUDA graph notes ask for ``cache_enabled=False``)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class StepAdam(torch.optim.Adam):
    """Adam whose ``step()`` can run a whole captured update (`StepGraph`) instead of the Adam arithmetic alone.

    Lightning's ``optimizer.step()`` keeps counting the update and calling its hooks; with `run_update` set, the
    update (loss, backward, clip, this Adam's arithmetic through `adam_step`, ...) runs there as one graph. Unset, it
    is plain Adam. The state dict is Adam's, so checkpoints do not depend on the mode.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_update: Callable[[], Any] | None = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.run_update is None:
            return super().step(closure)
        if closure is not None:  # Lightning's closure: its on_before_optimizer_step hooks
            with torch.enable_grad():
                closure()
        self.run_update()
        return None

    def mark_capturable(self) -> None:
        """Let Adam's step be captured (its capture check asks for the flag; fused Adam's arithmetic ignores it, so
        the eager steps before are the same; a checkpoint's groups may carry either value)."""
        for group in self.param_groups:
            group["capturable"] = True

    def adam_step(self) -> None:
        """Adam's arithmetic alone (what the update graph captures)."""
        super().step()
