"""The actors' snapshot of the learner: what the data stream acts with (`driml_pl.types.Actor`).

The actors act with a copy of the online network (``DRIML.actor``, saved in checkpoints so a resumed run acts as the
uninterrupted one) refreshed once per Lightning step, after that step's updates were launched. On a GPU the copy is
queued on the learner's stream and marked by a CUDA event; the data stream waits for the event on the device, and
the host never waits. With DRIML-ada the continuation matrix the horizon sampler reads is snapshotted with it. With
``model.cuda_graphs`` the greedy forward (resize, network, Q values, argmax) is one captured `StepGraph`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from driml_pl.learner.graphs import StepGraph
from driml_pl.learner.objective import q_values
from driml_pl.networks import preprocess


class ActorSnapshot:
    """Acting for the stream: `refresh` (the copy), `act` (greedy actions on the host), `continuation` (DRIML-ada).

    Args:
        module: the `DRIML` module whose ``actor``, ``online``, ``pair_model`` and ``support`` it reads (references,
            not parameters of its own, so the module's state-dict keys are the snapshot).
        cuda_graphs: capture the greedy forward on a GPU.
    """

    def __init__(self, module: Any, cuda_graphs: bool) -> None:
        self.module, self.cuda_graphs = module, cuda_graphs
        self._ready: Any = None  # CUDA event recorded after the last snapshot copy
        self._graph: StepGraph[Tensor] | None = None
        self._input: Tensor | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the online network into the snapshot, queued on the learner's stream after the updates launched so
        far; with the adaptive horizon the continuation matrix is snapshotted with it."""
        m = self.module
        torch._foreach_copy_(list(m.actor.parameters()), list(m.online.parameters()))
        if m.pair_model is not None:
            m.pair_model.snapshot_continuation()
        if m.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record()

    def _wait(self) -> None:
        """The calling (data) stream waits on the device for the last snapshot copy; the host does not wait."""
        if self._ready is not None:
            torch.cuda.current_stream(self.module.device).wait_event(self._ready)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Greedy actions of the snapshot for uint8 frame stacks, on the host (the one device -> host copy of the
        hot loop)."""
        self._wait()
        device = self.module.device
        if not self.cuda_graphs:
            return self._greedy(obs.to(device, non_blocking=True)).cpu()
        if self._graph is None or self._input is None or self._input.shape != obs.shape:
            self._input = obs.to(device, copy=True)
            static = self._input
            self._graph = StepGraph(lambda: self._greedy(static), device, what="the acting forward")
        else:
            self._input.copy_(obs, non_blocking=True)
        return self._graph().cpu()

    def _greedy(self, obs: Tensor) -> Tensor:
        m = self.module
        _, logits = m.actor(preprocess(obs, m.obs_size))
        return q_values(logits, m.support).argmax(-1)

    def continuation(self) -> Tensor:
        """DRIML-ada's continuation probabilities as of the last `refresh` (read by the data stream)."""
        pair = self.module.pair_model
        assert pair is not None, "only built with adaptive_horizon=true"
        self._wait()
        return pair.continuation_snapshot

    @property
    def adaptive(self) -> bool:
        return self.module.pair_model is not None
