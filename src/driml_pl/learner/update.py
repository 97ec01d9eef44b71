"""One update, written once: zero-grad, the objective, backward, global-norm clip, Adam, DRIML-ada's matrix, the
metrics row. Two runners run it:

* `EagerUpdate`: op by op (with the compiled objective when ``model.compile``), through Lightning's manual
  optimisation: ``manual_backward`` (precision plugins, DDP's gradient all-reduce) and ``optimizer.step()``.
* `CapturedUpdate` (``model.cuda_graphs`` on one device): the same body on static input tensors, held by one
  `StepGraph` (`driml_pl.learner.graphs`), so on a GPU the whole update is one graph replay. Lightning must still
  count the update (manual optimisation increments ``global_step`` inside ``LightningOptimizer.step``), so the
  replay is run *from* ``optimizer.step()``: `StepAdam.step` calls the graph instead of Adam's arithmetic, and the
  body steps Adam with `StepAdam.adam_step`. On the CPU nothing is captured: the body runs op by op on the same
  static tensors, which is how the CPU tests check it bitwise against `EagerUpdate`.

Both return ``(losses, values, counts)``: the objective's scalars and the update's metrics row (`DeviceMetrics.row`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from torch import Tensor, nn

from driml_pl.learner.graphs import StepAdam, StepGraph
from driml_pl.learner.metrics import DeviceMetrics
from driml_pl.learner.objective import UpdateInputs

StepOutput = tuple[dict[str, Tensor], Tensor, Tensor]  # an update's losses, and its metrics row


def update_body(
    module: Any,
    inputs: UpdateInputs,
    optimizer: torch.optim.Optimizer | LightningOptimizer,
    backward: Callable[[Tensor], None],
    step: Callable[[], Any],
    unscale: Callable[[], None] | None = None,
) -> StepOutput:
    """The update on ``inputs``: ``backward`` and ``step`` are how the runner differentiates and steps Adam."""
    optimizer.zero_grad(set_to_none=True)  # backward writes the gradients (in a capture: into the graph's memory)
    out = module.objective(inputs)  # `DRIML.objective`: what a subclass extends (docs/architecture.md)
    backward(out["loss"])
    if unscale is not None:  # 16-mixed: clip the true gradients
        unscale()
    clip_driml_gradients(module)
    step()
    if module.pair_model is not None:
        module.pair_model.update_matrix()
    return (out, *DeviceMetrics.row(out, inputs.k))


class EagerUpdate:
    """The update op by op, through Lightning's ``manual_backward`` and ``optimizer.step()``."""

    def __call__(self, module: Any, inputs: UpdateInputs, optimizer: LightningOptimizer) -> StepOutput:
        if module.compiled_in_cuda_graphs():  # inductor's own graphs (reduce-overhead): a new step begins
            torch.compiler.cudagraph_mark_step_begin()
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        unscale = (lambda: scaler.unscale_(optimizer.optimizer)) if scaler is not None else None
        return update_body(module, inputs, optimizer, module.manual_backward, optimizer.step, unscale)


class CapturedUpdate:
    """The update as one `StepGraph` on static inputs, replayed from Lightning's ``optimizer.step()`` (see above)."""

    def __init__(self) -> None:
        self.graph: StepGraph[StepOutput] | None = None
        self.inputs: UpdateInputs | None = None  # the static inputs the graph reads
        self.out: StepOutput | None = None  # the outputs of the last replay (the graph's own tensors)

    def __call__(self, module: Any, inputs: UpdateInputs, optimizer: LightningOptimizer) -> StepOutput:
        adam = optimizer.optimizer
        assert isinstance(adam, StepAdam), "model.cuda_graphs needs the module's own optimizer (StepAdam)"
        if self.graph is None or self.inputs is None:
            self.inputs = UpdateInputs(*(x.clone() if x is not None else None for x in inputs))  # type: ignore[arg-type]
            static = self.inputs
            self.graph = StepGraph(
                lambda: update_body(module, static, adam, Tensor.backward, adam.adam_step),
                module.device,
                before_capture=adam.mark_capturable,
                what="the update",
            )
        else:
            torch._foreach_copy_(_present(self.inputs), _present(inputs))
        adam.run_update = self._replay
        try:
            optimizer.step()  # Lightning counts the update and calls its hooks; StepAdam.step runs `_replay`
        finally:
            adam.run_update = None
        assert self.out is not None
        return self.out

    def _replay(self) -> None:
        assert self.graph is not None
        self.out = self.graph()


def _present(inputs: UpdateInputs) -> list[Tensor]:
    return [x for x in inputs if x is not None]


def main_parameters(module: nn.Module, pair_model: nn.Module | None) -> list[nn.Parameter]:
    """The parameters Adam's first group trains and the clip covers: all but DRIML-ada's pair network."""
    pair = {id(p) for p in pair_model.parameters()} if pair_model is not None else set()
    return [p for p in module.parameters() if p.requires_grad and id(p) not in pair]


def clip_driml_gradients(module: Any) -> None:
    """Global-norm clip over the DRIML parameters (spec §3: 10); DRIML-ada's pair network is left out."""
    nn.utils.clip_grad_norm_(module.clipped, module.max_grad_norm, foreach=module.device.type == "cuda" or None)
