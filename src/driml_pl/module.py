"""The DRIML LightningModule: C51 on a Nature-DQN encoder plus lambda-weighted InfoNCE terms (spec §2, §3, §6).

The update is written out in ``training_step`` (manual optimisation): loss, backward, clip, Adam step, target sync.
The hot loop keeps the host's work per update small and constant: the loss terms and the histogram of k are added
to device-side accumulators (no sync), and the metrics are read back and logged only on Lightning's logging steps
(``trainer.log_every_n_steps``) and at the last update of the budget. ``compile=True`` runs the loss through
``torch.compile`` (with CUDA graphs on a GPU). ``cuda_graphs=True`` captures the whole update (loss, backward, clip,
Adam, DRIML-ada's matrix) and the actors' forward as CUDA graphs (`driml_pl.graphs`): one launch each from the host.

Numerical faults: the first update whose loss terms are not all finite is recorded on the device too (no sync), and
read back on logging steps (on the CPU, where a read costs nothing, after every step), before any checkpoint is
written and at the end of training; `NonFiniteLossError` then stops the run, so no checkpoint ever holds the weights
such an update produced (`DRIML.check_finite`).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from driml_pl.adaptive import ActionPairModel, pair_permutation
from driml_pl.critic import TERMS, DIMCritic
from driml_pl.envs import NUM_ACTIONS
from driml_pl.graphs import GRAPH_COMPILE_MODES, GRAPH_PRECISIONS, StepAdam, StepGraph
from driml_pl.losses import c51_cross_entropy, categorical_projection
from driml_pl.networks import Features, QNetwork, preprocess
from driml_pl.remap import effective_actions, visible_mask
from driml_pl.types import Batch, RolloutStats, step_minibatches

# batches from the replay are already on the learner's device; the module's transfer hook (below) says so
warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule`")
# training_step fetches its own batch (see its docstring) and consumes the iterator once per step, as Lightning asks
warnings.filterwarnings("ignore", message="You are using the `dataloader_iter` step flavor")
warnings.filterwarnings("ignore", message="Found `dataloader_iter` argument in the `training_step`")
# printed by torch's own compiler (inductor) while compiling the loss; nothing a user can act on
warnings.filterwarnings("ignore", message=r"`torch._prims_common.check` is deprecated", category=FutureWarning)

K_LOGGED = 13  # horizons logged one by one (the paper's cap for DRIML-ada)
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_StepOutput = tuple[dict[str, Tensor], Tensor, Tensor]  # an update's losses, and its metrics row (`_DeviceMetrics.row`)
NO_FAULT = torch.iinfo(torch.int64).max  # `_DeviceMetrics.fault` while every loss term so far was finite


class NonFiniteLossError(FloatingPointError):
    """A loss term was NaN or Inf; raised before any checkpoint holds the weights that update produced (exit code 3)."""


class DRIML(pl.LightningModule):
    """C51 + InfoNCE. With every lambda at 0 this is the plain C51 baseline.

    Args:
        lambda_ll: weight of local(s_t, a_t) vs local(s_{t+k}).
        lambda_lg: weight of local(s_t, a_t) vs global(s_{t+k}).
        lambda_gl: weight of global(s_t, a_t) vs local(s_{t+k}).
        lambda_gg: weight of global(s_t, a_t) vs global(s_{t+k}) (paper Procgen command: 1, the others 0).
        num_atoms: C51 atoms (51).
        v_min: lowest atom (-10).
        v_max: highest atom (10).
        lr: Adam learning rate (2.5e-4).
        adam_eps: Adam epsilon (0.01 / 256 = 3.9e-5).
        max_grad_norm: global gradient-norm clip (10).
        target_update_interval: updates between hard copies of the online net into the target (312).
        obs_size: (H, W) the 64x64 frames are resized to on the device (paper: 104 x 80).
        frame_stack: frames per observation (linked from data.frame_stack).
        feature_dim: encoder fc width (512).
        action_dim: action embedding width (64).
        rkhs_dim: DIM projection width (512).
        score_clip: soft-clip cap c of the scores, c * tanh(x / c) (20).
        action_conditioned: False is the DRIML-noact ablation (no action input, shared symmetric heads; set rkhs_dim
            to 128 as the released code does).
        adaptive_horizon: build DRIML-ada's action-pair network (linked from data.horizon.mode == adaptive).
        game: the Procgen game (linked from data.env.game); DRIML-ada's softmax runs over its effective actions.
        seed: the run's seed (linked from seed_everything); seeds DRIML-ada's initial A and its negative shuffles.
        pair_hidden: hidden width of the action-pair network (64).
        horizon_decay: EMA factor of the continuation matrix, A <- decay * A + (1 - decay) * map(Q) (0.9).
        continuation_eps: continuation probabilities are clipped to [eps, 1 - eps] (0.05).
        continuation_map: how DRIML-ada's pair scores Q become continuation probabilities: ``sigmoid`` (default;
            the JSD critic's probability of a real pair) or ``softmax`` (a row softmax over the effective actions,
            the paper's description). See `driml_pl.adaptive` and the README's measurements.
        compile: run the loss (forward and backward) through ``torch.compile``; equal to eager within float
            tolerance. Compiling takes a minute or two at start-up.
        compile_mode: ``torch.compile`` mode; ``auto`` is ``reduce-overhead`` (CUDA graphs) on a GPU and
            ``default`` on the CPU (and ``default`` with ``cuda_graphs``, which captures the graphs itself).
        cuda_graphs: capture the whole update (loss, backward, global-norm clip, Adam, DRIML-ada's matrix update) and
            the actors' greedy forward as CUDA graphs, each replayed with one launch (`driml_pl.graphs`). The first
            3 updates run eagerly, then the capture. One device only: under DDP only the acting is captured (the
            gradient all-reduce is not). Not with ``16-mixed`` (its scaler reads back every update). On the CPU the
            same update runs op by op, bitwise equal to ``false``.
        matmul_precision: float32 matrix products on a GPU: ``high`` lets them use TF32 tensor cores, as cuDNN's
            convolutions already do by default in PyTorch; ``highest`` keeps full float32 (no effect on the CPU).
    """

    def __init__(
        self,
        lambda_ll: float = 0.0,
        lambda_lg: float = 0.0,
        lambda_gl: float = 0.0,
        lambda_gg: float = 1.0,
        num_atoms: int = 51,
        v_min: float = -10.0,
        v_max: float = 10.0,
        lr: float = 2.5e-4,
        adam_eps: float = 0.01 / 256,
        max_grad_norm: float = 10.0,
        target_update_interval: int = 312,
        obs_size: tuple[int, int] = (104, 80),
        frame_stack: int = 1,
        feature_dim: int = 512,
        action_dim: int = 64,
        rkhs_dim: int = 512,
        score_clip: float = 20.0,
        action_conditioned: bool = True,
        adaptive_horizon: bool = False,
        game: str = "bigfish",
        seed: int = 0,
        pair_hidden: int = 64,
        horizon_decay: float = 0.9,
        continuation_eps: float = 0.05,
        continuation_map: str = "sigmoid",
        compile: bool = False,
        compile_mode: str = "auto",
        cuda_graphs: bool = False,
        matmul_precision: str = "high",
    ) -> None:
        super().__init__()
        if not v_min < v_max or num_atoms < 2:
            raise ValueError(f"need v_min < v_max and num_atoms >= 2, got {v_min}, {v_max}, {num_atoms}")
        if target_update_interval < 1:
            raise ValueError(f"model.target_update_interval must be >= 1, got {target_update_interval}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode={compile_mode!r} is not allowed; valid: {', '.join(COMPILE_MODES)}")
        if cuda_graphs and compile_mode not in GRAPH_COMPILE_MODES:
            raise ValueError(
                f"model.compile_mode={compile_mode!r} is not allowed with model.cuda_graphs=true (it makes CUDA graphs "
                f"of its own); valid: {', '.join(GRAPH_COMPILE_MODES)}"
            )
        self.save_hyperparameters()
        self.automatic_optimization = False  # the update is spelled out in training_step
        self.lambdas = {t: float(getattr(self.hparams, f"lambda_{t}")) for t in TERMS}
        self.obs_size: tuple[int, int] = (int(obs_size[0]), int(obs_size[1]))
        self.support: Tensor
        self.lr, self.adam_eps, self.max_grad_norm = lr, adam_eps, max_grad_norm
        self.target_update_interval = target_update_interval
        self.online = QNetwork(3 * frame_stack, self.obs_size, feature_dim, NUM_ACTIONS, num_atoms)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        # the actors' snapshot of the online network, refreshed once per Lightning step (`sync_actor`); saved in
        # checkpoints so a resumed run acts exactly as the uninterrupted one
        self.actor = copy.deepcopy(self.online).requires_grad_(False)
        enc = self.online.encoder
        self.critic = DIMCritic(
            tuple(t for t, lam in self.lambdas.items() if lam != 0.0),
            local_channels=enc.local_channels,
            global_dim=feature_dim,
            num_actions=NUM_ACTIONS,
            action_dim=action_dim,
            rkhs_dim=rkhs_dim,
            clip=score_clip,
            action_conditioned=action_conditioned,
        )
        self.pair_model: ActionPairModel | None = None
        if adaptive_horizon:
            visible = torch.from_numpy(visible_mask(effective_actions(game)))
            self.pair_model = ActionPairModel(
                pair_hidden, horizon_decay, continuation_eps, seed=seed, visible=visible, mapping=continuation_map
            )
        self.seed = seed
        self._pair_generator: torch.Generator | None = None  # draws DRIML-ada's negative shuffles, on the device
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms), persistent=False)
        self._actor_ready: Any = None  # CUDA event recorded after the last snapshot copy
        self._clipped: list[nn.Parameter] = []  # set by configure_optimizers
        self._compile, self._compile_mode = compile, compile_mode
        if matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(
                f"model.matmul_precision={matmul_precision!r} is not allowed; valid: highest, high, medium"
            )
        self.matmul_precision = matmul_precision
        self._compiled_losses: Any = None  # torch.compile(core_losses), built at the first update
        self._cuda_graphs = cuda_graphs
        self._graph_update = cuda_graphs  # off under DDP (set in setup)
        self._update_graph: StepGraph[_StepOutput] | None = None  # the captured update, built at the first one
        self._update_inputs: list[Tensor] = []  # its static inputs
        self._update_out: _StepOutput | None = None  # its outputs of the last update
        self._act_graph: StepGraph[Tensor] | None = None  # the actors' captured forward
        self._act_input: Tensor | None = None
        self._metrics = _DeviceMetrics()
        self._perf: tuple[float, int, int] | None = None  # (time, global env steps, updates) at the last log
        self._last_good_step: int | None = None  # global_step of the last checkpoint saved or resumed from
        self._faults = _FaultInjection.from_env()  # test hooks; None in normal runs

    def setup(self, stage: str) -> None:
        if torch.cuda.is_available() and self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision(self.matmul_precision)
        if stage == "fit" and self.trainer.world_size > 1:  # InfoNCE negatives from the global batch
            self.critic.distribute(self.trainer.global_rank, self.trainer.world_size)
        if self._cuda_graphs and stage == "fit":
            precision = str(self.trainer.precision)
            if precision not in GRAPH_PRECISIONS:
                raise ValueError(
                    f"trainer.precision={precision} is not allowed with model.cuda_graphs=true (the gradient scaler "
                    f"reads back to the host every update); valid: {', '.join(GRAPH_PRECISIONS)}"
                )
            self._graph_update = self.trainer.world_size == 1
            if not self._graph_update:
                rank_zero_warn(
                    "model.cuda_graphs under DDP captures the acting only; the update runs op by op (the gradient "
                    "all-reduce is not captured)"
                )

    def _core(self) -> Any:
        """`core_losses`, or its compiled form (built at the first update, once the module is on its device)."""
        if not self._compile:
            return self.core_losses
        if self._compiled_losses is None:
            mode = self._compile_mode
            if mode == "auto":
                mode = "reduce-overhead" if self.device.type == "cuda" and not self._cuda_graphs else "default"
            self._compiled_losses = torch.compile(self.core_losses, mode=mode)
        return self._compiled_losses

    # ------------------------------------------------------------------------------------------------ acting
    def q_values(self, logits: Tensor) -> Tensor:
        """Expected return per action. Shape: (B, A, atoms) -> (B, A)."""
        return (torch.softmax(logits.float(), dim=-1) * self.support).sum(-1)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Greedy actions of the online network for uint8 frame stacks (N, S, 64, 64, 3); stays on the device."""
        x = preprocess(obs.to(self.device, non_blocking=True), self.obs_size)
        _, logits = self.online(x)
        return self.q_values(logits).argmax(-1)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A replay on the learner's device hands out minibatches that are already there: skip Lightning's generic
        walk over them (a third of a millisecond per update)."""
        if isinstance(batch, Batch):  # (a NamedTuple, so tested before plain tuples)
            return _to_device(batch, device)
        if isinstance(batch, tuple) and all(isinstance(b, Batch) for b in batch):
            return tuple(_to_device(b, device) for b in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @torch.no_grad()
    def sync_actor(self) -> None:
        """Copy the online network into the actors' snapshot, queued on the learner's stream after the updates
        launched so far; with the adaptive horizon the continuation matrix is snapshotted with it."""
        torch._foreach_copy_(list(self.actor.parameters()), list(self.online.parameters()))
        if self.pair_model is not None:
            self.pair_model.snapshot_continuation()
        if self.device.type == "cuda":
            self._actor_ready = torch.cuda.Event()
            self._actor_ready.record()

    def _wait_actor(self) -> None:
        """The calling (data) stream waits on the device for the last snapshot copy; the host does not wait."""
        if self._actor_ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._actor_ready)

    @torch.no_grad()
    def act_actor(self, obs: Tensor) -> Tensor:
        """Greedy actions of the actors' snapshot, on the host (the one device -> host copy of the hot loop)."""
        self._wait_actor()
        if not self._cuda_graphs:
            return self._actor_greedy(obs.to(self.device, non_blocking=True)).cpu()
        if self._act_graph is None or self._act_input is None or self._act_input.shape != obs.shape:
            self._act_input = obs.to(self.device, copy=True)
            self._act_graph = StepGraph(
                lambda: self._actor_greedy(self._act_input),  # type: ignore[arg-type]
                self.device,
                what="the acting forward",
            )
        else:
            self._act_input.copy_(obs, non_blocking=True)
        return self._act_graph().cpu()

    def _actor_greedy(self, obs: Tensor) -> Tensor:
        _, logits = self.actor(preprocess(obs, self.obs_size))
        return self.q_values(logits).argmax(-1)

    def continuation_snapshot(self) -> Tensor:
        """DRIML-ada's continuation probabilities as of the last `sync_actor` (read by the data stream)."""
        assert self.pair_model is not None, "only built with adaptive_horizon=true"
        self._wait_actor()
        return self.pair_model.continuation_snapshot

    # ---------------------------------------------------------------------------------------------- learning
    def core_losses(
        self,
        obs: Tensor,
        action: Tensor,
        returns: Tensor,
        discount: Tensor,
        next_obs: Tensor,
        positive_obs: Tensor,
        nce_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """C51 cross-entropy, one InfoNCE per active term, ``q_mean`` and their weighted sum ``loss`` (scalars).

        ``nce_weight`` (B,) scales each anchor's InfoNCE terms (`infonce_loss`): `losses` passes 0 for an anchor whose
        effective horizon is 0 (the last transition of an episode, with no later frame in it) and 1 otherwise.
        Tensors only (no Python values that change per update), so ``torch.compile`` traces it once.
        """
        b = action.shape[0]
        rows = torch.arange(b, device=action.device)
        frames = torch.cat([obs, positive_obs]) if self.critic.terms else obs
        features = self.online.encoder(preprocess(frames, self.obs_size))
        logits = self.online.head(features.global_[:b])
        with torch.no_grad():
            _, next_logits = self.target(preprocess(next_obs, self.obs_size))
            next_probs = torch.softmax(next_logits.float(), dim=-1)
            greedy = (next_probs * self.support).sum(-1).argmax(-1)  # no double-Q (spec §3)
            target = categorical_projection(self.support, next_probs[rows, greedy], returns, discount)
        out = {"c51_loss": c51_cross_entropy(logits[rows, action], target).mean()}
        loss = out["c51_loss"]
        if self.critic.terms:
            anchor = Features(features.local[:b], features.global_[:b])
            positive = Features(features.local[b:], features.global_[b:])
            for term, value in self.critic(anchor, action, positive, nce_weight).items():
                out[f"nce_{term}"] = value
                loss = loss + self.lambdas[term] * value
        with torch.no_grad():
            out["q_mean"] = self.q_values(logits.detach()).mean()
        out["loss"] = loss
        return out

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """`core_losses` plus DRIML-ada's pair loss (its parameters are disjoint, so adding it trains it alone)."""
        return self._losses(self._loss_inputs(batch))

    def _loss_inputs(self, batch: Batch) -> list[Tensor]:
        """The tensors an update reads, in `_losses`' order; DRIML-ada's negative shuffle is drawn here."""
        inputs = [batch.obs, batch.action, batch.returns, batch.discount, batch.next_obs, batch.positive_obs, batch.k]
        if self.pair_model is not None and batch.action_window is not None and batch.pair_valid is not None:
            perm = pair_permutation(batch.pair_valid, self._shuffle_generator())
            inputs += [batch.action_window, batch.pair_valid, perm]
        return inputs

    def _losses(self, inputs: list[Tensor]) -> dict[str, Tensor]:
        obs, action, returns, discount, next_obs, positive_obs, k, *pairs = inputs
        has_future = (k > 0).float()  # k = 0: the positive would be s_t itself; the anchor is left out
        out = dict(self._core()(obs, action, returns, discount, next_obs, positive_obs, has_future))
        if self.pair_model is not None and pairs:
            window, valid, perm = pairs
            out["pair_loss"] = self.pair_model.loss(window, valid, perm=perm)
            out["loss"] = out["loss"] + out["pair_loss"]
        return out

    def _shuffle_generator(self) -> torch.Generator:
        """The generator of this update's negative shuffle, seeded from (run seed, update count): a resumed run draws
        what an uninterrupted one does, and runs with different seeds draw differently."""
        if self._pair_generator is None or self._pair_generator.device != self.device:
            self._pair_generator = torch.Generator(device=self.device)
        seed = np.random.SeedSequence([self.seed, self.global_step]).generate_state(1)[0]
        return self._pair_generator.manual_seed(int(seed))

    def training_step(self, dataloader_iter: Iterator[Any]) -> None:
        """The updates of one Lightning step (`data.updates_per_batch` minibatches, in order), then the logs.

        The step fetches its own batch (Lightning's ``dataloader_iter`` form): Lightning would otherwise fetch one
        batch ahead within an epoch but not across epochs, and the actors' policy lag would depend on where epochs
        end. Fetched here, the env steps that feed step j always act with the weights after step j - 2.
        """
        batch, _, _ = next(dataloader_iter)  # StopIteration ends the epoch
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        minibatches = step_minibatches(batch)  # issue 19 hook: the one reader of a step's batch (types.py)
        for minibatch in minibatches:
            self.update(minibatch)
        last = minibatches[-1]
        if last.stats.last:
            self.trainer.should_stop = True  # the budget is spent: this step's metrics are written too
        logging = self.trainer._logger_connector.should_update_logs
        if logging or self.device.type == "cpu":  # a read back stalls a GPU; on the CPU it costs nothing
            self.check_finite()
        if logging:
            self._log_metrics(last)

    def update(self, batch: Batch) -> None:
        """One update: loss, backward, clip (global norm over the DRIML parameters), Adam, target sync."""
        optimizer = self.optimizers()
        assert isinstance(optimizer, pl.core.optimizer.LightningOptimizer)
        if self._graph_update and self._faults is None:
            out, values, counts = self._captured_update(batch, optimizer)
        else:
            out = self._op_by_op_update(batch, optimizer)
            values, counts = _DeviceMetrics.row(out, batch.k)
        if self.global_step % self.target_update_interval == 0:
            self.sync_target()
        # global_step now counts this update: it is update N
        self._metrics.add_row([*out, "horizon/k_mean"], values, counts, self.global_step)

    def _captured_update(self, batch: Batch, optimizer: pl.core.optimizer.LightningOptimizer) -> _StepOutput:
        """The update as one `StepGraph`: the batch is copied into its static inputs, then Lightning's
        ``optimizer.step()`` (which counts the update and calls its hooks) runs the graph through `StepAdam`."""
        inputs = self._loss_inputs(batch)
        adam = optimizer.optimizer
        assert isinstance(adam, StepAdam), "model.cuda_graphs needs the module's own optimizer (StepAdam)"
        # the same static inputs on every device: on the CPU nothing is captured, but the tests then check this path
        if self._update_graph is None:
            self._update_inputs = [x.clone() for x in inputs]
            self._update_graph = StepGraph(
                self._update_step, self.device, before_capture=adam.mark_capturable, what="the update"
            )
        else:
            torch._foreach_copy_(self._update_inputs, inputs)
        adam.run_update = self._run_update_graph
        try:
            optimizer.step()
        finally:
            adam.run_update = None
        assert self._update_out is not None
        return self._update_out

    def _run_update_graph(self) -> None:
        assert self._update_graph is not None
        self._update_out = self._update_graph()

    def _update_step(self) -> _StepOutput:
        """What the update graph holds: loss, backward, clip, Adam, DRIML-ada's matrix and the metrics' row, on the
        static inputs."""
        adam = self.trainer.optimizers[0]
        assert isinstance(adam, StepAdam)
        adam.zero_grad(set_to_none=True)  # backward writes the gradients (in a capture: into the graph's memory)
        out = self._losses(self._update_inputs)
        out["loss"].backward()
        self.clip_driml_gradients()
        adam.adam_step()
        if self.pair_model is not None:
            self.pair_model.update_matrix()
        k = self._update_inputs[6]  # `_loss_inputs`' order: obs, action, returns, discount, next_obs, positive_obs, k
        return (out, *_DeviceMetrics.row(out, k))

    def _op_by_op_update(self, batch: Batch, optimizer: pl.core.optimizer.LightningOptimizer) -> dict[str, Tensor]:
        if self._compiled_losses is not None and self.device.type == "cuda" and not self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.losses(batch)
        if self._faults is not None:
            out = self._faults.inject(out, self.global_step + 1, self.global_rank)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(out["loss"])
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed: clip the true gradients
            scaler.unscale_(optimizer.optimizer)
        self.clip_driml_gradients()
        optimizer.step()
        if self.pair_model is not None:
            self.pair_model.update_matrix()
        return out

    def _log_metrics(self, batch: Batch) -> None:
        """Means since the last log of the loss terms and of k, the continuation statistics and the rollout.

        Under DDP every value is global: the loss terms and k statistics are averaged over the ranks (each holds an
        equal share of the global batch, so this is the global batch's mean) and the episode statistics summed over
        them. These are collectives; every rank logs on the same (global) steps.
        """
        values = self._metrics.read_and_reset()
        sync = self.trainer.world_size > 1
        train = {f"train/{k}": v for k, v in values.items() if not k.startswith("horizon/")}
        self.log_dict(train, batch_size=1, sync_dist=sync)
        self.log_dict({k: v for k, v in values.items() if k.startswith("horizon/")}, batch_size=1, sync_dist=sync)
        if self.pair_model is not None:
            probs = self.pair_model.continuation()
            visible = self.pair_model.visible
            block = probs[visible][:, visible]
            self.log_dict({
                "horizon/continuation_mean": block.mean(),
                "horizon/continuation_repeat": block.diagonal().mean(),
                "horizon/continuation_max": block.max(),
            }, batch_size=1)  # fmt: skip
        stats, world = batch.stats, self.trainer.world_size
        env_steps = int(stats.env_steps) * world
        # env steps and epsilon are exact globally (every rank steps alike); episode statistics are reduced
        self.log("rollout/env_steps", float(env_steps), prog_bar=True, reduce_fx="max", batch_size=1)
        self.log("rollout/epsilon", float(stats.epsilon), batch_size=1)
        episodes, episode_return, episode_length = self._global_episodes(stats)
        self.log("rollout/episodes", episodes, batch_size=1)
        if not np.isnan(episode_return):
            self.log("rollout/episode_return", episode_return, prog_bar=True, batch_size=1)
            self.log("rollout/episode_length", episode_length, batch_size=1)
        now, updates = time.perf_counter(), self.global_step
        if self._perf is not None and now > self._perf[0]:
            t0, e0, u0 = self._perf
            self.log("perf/env_steps_per_s", (env_steps - e0) / (now - t0), prog_bar=True, batch_size=1)
            self.log("perf/updates_per_s", (updates - u0) / (now - t0), batch_size=1)
        self._perf = (now, env_steps, updates)

    def _global_episodes(self, stats: RolloutStats) -> tuple[float, float, float]:
        """Finished episodes of all ranks, and the mean return and length over every rank's recent episodes (its last
        100): one all-reduce of sums and counts under DDP (a collective, on logging steps only)."""
        if self.trainer.world_size == 1:
            return float(stats.episodes), float(stats.episode_return), float(stats.episode_length)
        n = stats.recent
        sums = [stats.episodes, stats.episode_return * n if n else 0.0, stats.episode_length * n if n else 0.0, n]
        local = torch.tensor(sums, dtype=torch.float64, device=self.device)
        episodes, ret, length, count = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
        if count == 0:
            return episodes, float("nan"), float("nan")
        return episodes, ret / count, length / count

    # -------------------------------------------------------------------------------------- numerical faults
    def check_finite(self, all_ranks: bool = False) -> None:
        """Raise `NonFiniteLossError` if a loss term of any update so far was NaN or Inf (one device -> host read).

        The message names the first such update (counted from 1: update N leaves ``global_step == N``), its first
        non-finite term (the weighted sum ``loss`` only when no single term is) and the last good checkpoint.
        ``all_ranks`` takes the earliest fault over every DDP rank (a collective: every rank must call it), as the
        checkpoint guard does, since rank 0 writes the checkpoint of all ranks.
        """
        self._metrics.flush()
        fault = self._metrics.fault
        if fault is None:
            fault = torch.full((), NO_FAULT, dtype=torch.int64, device=self.device)
        if all_ranks and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            fault = fault.clone()
            torch.distributed.all_reduce(fault, op=torch.distributed.ReduceOp.MIN)
        code = int(fault)
        if code == NO_FAULT:
            return
        update, what = self._metrics.describe(code)
        callback = getattr(self.trainer, "checkpoint_callback", None)
        path = getattr(callback, "last_model_path", "") or self.trainer.ckpt_path
        if path and self._last_good_step is not None:
            last = f"the last good checkpoint is {path} (update {self._last_good_step}), left as it was"
        else:
            last = "no checkpoint of this run was written"
        raise NonFiniteLossError(f"non-finite loss at update {update}: {what}; the run stops here and {last}")

    def nonfinite_update(self) -> int | None:
        """The first update of this rank with a non-finite loss term, or None (one device -> host read)."""
        self._metrics.flush()
        fault = self._metrics.fault
        code = NO_FAULT if fault is None else int(fault)
        return None if code == NO_FAULT else self._metrics.describe(code)[0]

    def configure_callbacks(self) -> list[Callback]:
        return [_FiniteLossGuard()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last_good_step = int(checkpoint["global_step"])  # `_FiniteLossGuard` has checked the losses
        # the sums since the last log: a resumed run logs the same means as the uninterrupted one
        checkpoint["driml_metrics"] = self._metrics.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last_good_step = int(checkpoint.get("global_step", 0))
        if "driml_metrics" in checkpoint:
            self._metrics.load_state_dict(checkpoint["driml_metrics"])
        saved = checkpoint.get("hyper_parameters", {})
        if self.pair_model is not None and "continuation_map" not in saved and self.pair_model.mapping != "softmax":
            # written before model.continuation_map existed, when the row softmax was the only map: keep it
            warnings.warn(
                "this DRIML-ada checkpoint predates model.continuation_map; it goes on with the softmax it was "
                "trained with",
                stacklevel=2,
            )
            self.pair_model.mapping = "softmax"
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                # how the writing run stepped Adam (captured or not), not training state: this run sets its own
                group["capturable"] = False

    def sync_target(self) -> None:
        """Hard copy of the online network into the target network."""
        self.target.load_state_dict(self.online.state_dict())

    def on_train_epoch_end(self) -> None:
        stream = getattr(getattr(self.trainer, "datamodule", None), "stream", None)
        if stream is not None and stream.exhausted:
            self.trainer.should_stop = True  # the env-step budget is spent

    def _main_parameters(self) -> list[nn.Parameter]:
        pair = {id(p) for p in self.pair_model.parameters()} if self.pair_model is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in pair]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the online network and critic; DRIML-ada's pair network is a second parameter group.

        Adam keeps no state across parameters, so a separate group with the same settings is exactly "its own Adam"
        (spec §2.6) while Lightning keeps counting one optimizer step per update; it is also left out of clipping.
        """
        self._clipped = self._main_parameters()  # the same Parameter objects for the whole run
        self._update_graph = None  # a graph captured with an earlier optimizer would update its state, not this one's
        groups: list[dict[str, Any]] = [{"params": self._clipped}]
        if self.pair_model is not None:
            groups.append({"params": list(self.pair_model.parameters())})
        # one fused kernel updates every parameter, on the GPU and the CPU alike, so CPU runs and tests use the GPU's
        # code path; the loop version reads each parameter's step count back to the host (a sync per parameter on a
        # GPU). Same update rule: after 20 steps the two differ by at most 3e-8; CPU speed at the paper's size is
        # the same (5.1 DRIML updates/s with either)
        return StepAdam(groups, lr=self.lr, eps=self.adam_eps, fused=True)

    def clip_driml_gradients(self) -> None:
        """Global-norm clip over the DRIML parameters (spec §3: 10); DRIML-ada's pair network is left out."""
        nn.utils.clip_grad_norm_(self._clipped, self.max_grad_norm, foreach=self.device.type == "cuda" or None)

    # -------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_eval("eval", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_eval("test", batch)

    def _log_eval(self, prefix: str, batch: dict[str, Any]) -> None:
        """``<prefix>/<level set>_{return,return_std,episodes,capped,length}`` over every rank's episodes, and
        ``<prefix>/env_steps`` (the training run's global env steps) during fit."""
        returns = self._gather_episodes(batch["episode_return"])
        lengths = self._gather_episodes(batch["episode_length"])
        capped = self._gather_episodes(batch["capped"])
        key, n = f"{prefix}/{batch['level_set']}", returns.numel()
        values = {f"{key}_episodes": float(n), f"{key}_capped": float(capped.sum())}
        if n:
            values |= {
                f"{key}_return": float(returns.mean()),
                f"{key}_return_std": float(returns.std(unbiased=False)),
                f"{key}_length": float(lengths.mean()),
            }
        if int(batch["env_steps"]) >= 0:
            values[f"{prefix}/env_steps"] = float(batch["env_steps"])
        self.log_dict(values, add_dataloader_idx=False, batch_size=1)

    def _gather_episodes(self, x: Tensor) -> Tensor:
        """Every rank's episodes (ranks may hold different counts), as float64 on the host."""
        x = x.double().cpu()
        if self.trainer.world_size == 1:
            return x
        local = x.to(self.device)
        counts = torch.as_tensor(self.all_gather(torch.tensor([local.numel()], device=self.device))).view(-1)
        padded = torch.full((int(counts.max()),), float("nan"), dtype=torch.float64, device=self.device)
        padded[: local.numel()] = local
        rows = torch.as_tensor(self.all_gather(padded)).view(len(counts), -1)
        return torch.cat([rows[i, : int(c)] for i, c in enumerate(counts)]).cpu()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if batch.obs.device == device:
        return batch
    moved: list[Any] = [x.to(device, non_blocking=True) if isinstance(x, Tensor) else x for x in batch]
    return Batch(*moved)


class _FiniteLossGuard(Callback):
    """Checks the losses (every rank's) before a checkpoint is written and at the end of training.

    Lightning 2.6's ``dump_checkpoint`` calls every callback's ``state_dict`` before the data module's ``state_dict``
    (which replaces each rank's stream file) and before any file is opened; ``on_save_checkpoint`` hooks run after
    the stream file is replaced, too late. So the check runs in ``state_dict``, and a fault leaves the previous
    ``last.ckpt`` and stream files untouched.
    """

    def __init__(self) -> None:
        self.module: DRIML | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.module = pl_module if isinstance(pl_module, DRIML) else None

    def state_dict(self) -> dict[str, Any]:
        if self.module is not None:
            self.module.check_finite(all_ranks=True)
        return {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, DRIML):
            pl_module.check_finite(all_ranks=True)


class _FaultInjection:
    """Test hooks, read from the environment when the module is built; none is set in a normal run.

    ``DRIML_INJECT_NAN_AT_UPDATE=N`` multiplies update N's C51 loss (and so the total loss) by NaN, so that update
    writes NaN weights. ``DRIML_INJECT_FAIL_AT_UPDATE=N`` kills rank ``DRIML_INJECT_FAIL_RANK`` (default 1) in update
    N: a RuntimeError, with ``DRIML_INJECT_FAIL_MODE=exit`` a hard death (``os._exit(1)``, no clean-up), with
    ``hang`` a rank that stops responding (sleeps for ever). Updates count from 1.
    """

    def __init__(self, nan_at: int | None, fail_at: int | None, fail_rank: int, fail_mode: str) -> None:
        self.nan_at, self.fail_at, self.fail_rank, self.fail_mode = nan_at, fail_at, fail_rank, fail_mode

    @classmethod
    def from_env(cls) -> _FaultInjection | None:
        nan_at, fail_at = (os.environ.get(f"DRIML_INJECT_{x}_AT_UPDATE") for x in ("NAN", "FAIL"))
        if not nan_at and not fail_at:
            return None
        rank, mode = int(os.environ.get("DRIML_INJECT_FAIL_RANK", "1")), os.environ.get("DRIML_INJECT_FAIL_MODE", "")
        return cls(int(nan_at) if nan_at else None, int(fail_at) if fail_at else None, rank, mode)

    def inject(self, out: dict[str, Tensor], update: int, rank: int) -> dict[str, Tensor]:
        if update == self.fail_at and rank == self.fail_rank:
            if self.fail_mode == "exit":
                os._exit(1)
            while self.fail_mode == "hang":
                time.sleep(1)
            raise RuntimeError(f"injected failure of rank {rank} in update {update} (DRIML_INJECT_FAIL_AT_UPDATE)")
        if update == self.nan_at:
            out = dict(out)
            out["c51_loss"] = out["c51_loss"] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        return out


class _DeviceMetrics:
    """Sums of the per-update scalars and of the k histogram, kept on the device; read back only when logged.

    Each update's scalars are copied into a row of a small device buffer (one copy, as the running sum was one add);
    `flush` folds the rows into the sums and, with a few element-wise ops and a minimum over all of them, into
    ``fault``: an int64 that encodes the first update with a non-finite scalar, its first such key (``loss`` ranked
    last, so a term is named when one is at fault) and whether it was NaN, +Inf or -Inf, as
    ``(update * len(keys) + slot) * 3 + kind``, and stays `NO_FAULT` while all are finite. Nothing is read back to
    the host: the buffer is flushed when full (every `ROWS` updates), when read (logs, `DRIML.check_finite`) and
    when saved. ``fault`` is never reset.
    """

    ROWS = 256

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.sums: Tensor | None = None
        self.k_hist: Tensor | None = None
        self.count = 0
        self.fault: Tensor | None = None
        self._slots: list[str] = []  # the keys in fault order
        self._rows: Tensor | None = None  # (ROWS, keys): the scalars of the updates not yet flushed
        self._row_code: Tensor | None = None  # (ROWS, keys): the fault code of each cell, less update and kind
        self._no_fault: Tensor | None = None
        self._held = 0  # rows in use
        self._first = 0  # the update of row 0

    def _build(self, device: torch.device) -> None:
        """The fault order and the buffers for ``keys``, on ``device`` (after the first update or a restore)."""
        n = len(self.keys)
        self._slots = [key for key in self.keys if key != "loss"] + [key for key in self.keys if key == "loss"]
        slots = torch.tensor([self._slots.index(key) for key in self.keys], dtype=torch.int64)
        self._row_code = (torch.arange(self.ROWS)[:, None] * n + slots[None, :]).mul_(3).to(device)
        self._rows = torch.zeros(self.ROWS, n, dtype=torch.float32, device=device)
        self._no_fault = torch.full((), NO_FAULT, dtype=torch.int64, device=device)
        if self.fault is None:
            self.fault = self._no_fault.clone()
        self._held = 0

    @staticmethod
    def row(out: dict[str, Tensor], k: Tensor) -> tuple[Tensor, Tensor]:
        """One update's scalars (``out``'s values, then the mean k) and its counts of k per logged bin: device ops
        only, so the captured update computes them inside its graph."""
        values = torch.stack([v.detach().float() for v in out.values()] + [k.float().mean()])
        bins = k.clamp(max=K_LOGGED + 1)  # a comparison, not bincount, which reads the maximum back on a GPU
        counts = (bins[:, None] == torch.arange(K_LOGGED + 2, device=k.device)).sum(0, dtype=torch.float32)
        return values, counts

    def add(self, out: dict[str, Tensor], k: Tensor, update: int) -> None:
        self.add_row([*out, "horizon/k_mean"], *self.row(out, k), update)

    def add_row(self, keys: list[str], values: Tensor, counts: Tensor, update: int) -> None:
        """Record one update's `row` (``keys`` name ``values``); two device ops, no read-back."""
        if self.sums is None or self.k_hist is None:
            self.keys = keys
            self.sums = torch.zeros_like(values)
            self.k_hist = torch.zeros(K_LOGGED + 2, dtype=torch.float32, device=values.device)
        if self._rows is None or self._rows.device != values.device:  # first update, or restored elsewhere
            self.sums, self.k_hist = self.sums.to(values.device), self.k_hist.to(values.device)
            self.fault = None if self.fault is None else self.fault.to(values.device)
            self._build(values.device)
        assert self._rows is not None
        if self._held and update != self._first + self._held:  # rows hold consecutive updates
            self.flush()
        if self._held == 0:
            self._first = update
        self._rows[self._held].copy_(values)
        self._held += 1
        if self._held == self.ROWS:
            self.flush()
        self.k_hist += counts
        self.count += 1

    def flush(self) -> None:
        """Fold the buffered rows into ``sums`` and ``fault`` (device ops only)."""
        if not self._held:
            return
        assert self._rows is not None and self._row_code is not None and self.sums is not None
        assert self.fault is not None and self._no_fault is not None
        rows = self._rows[: self._held]
        self.sums += rows.sum(0)
        kind = (rows > 0).long() + (rows < 0).long() * 2  # NaN 0, +Inf 1, -Inf 2 (where not finite)
        code = self._row_code[: self._held] + (kind + self._first * len(self.keys) * 3)
        code = torch.where(rows.isfinite(), self._no_fault, code)
        torch.minimum(self.fault, code.min(), out=self.fault)  # updates only grow: the first fault is kept
        self._held = 0

    def read_and_reset(self) -> dict[str, Tensor]:
        self.flush()
        if self.sums is None or self.k_hist is None or self.count == 0:
            return {}
        means = self.sums / self.count
        out = {key: means[i] for i, key in enumerate(self.keys)}
        hist = self.k_hist / self.k_hist.sum()
        for j in range(K_LOGGED + 1):
            out[f"horizon/k_frac_{j}"] = hist[j]
        out[f"horizon/k_frac_over{K_LOGGED}"] = hist[K_LOGGED + 1]
        self.sums.zero_()
        self.k_hist.zero_()
        self.count = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        tensors = {"sums": self.sums, "k_hist": self.k_hist, "fault": self.fault}
        return {"keys": list(self.keys), "count": self.count, **{k: v for k, v in tensors.items() if v is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sums" not in state:
            return
        self.keys = list(state["keys"])
        self.count = int(state["count"])
        self.sums, self.k_hist, self.fault = state["sums"], state["k_hist"], state.get("fault")
        self._build(self.sums.device)

    def describe(self, code: int) -> tuple[int, str]:
        """A `fault` code as (update, "train/<key>=<nan|inf|-inf>")."""
        n = max(1, len(self._slots))
        update, rest = divmod(code, 3 * n)
        slot, kind = divmod(rest, 3)
        key = self._slots[slot] if slot < len(self._slots) else f"#{slot}"
        key = key if key.startswith("horizon/") else f"train/{key}"
        return update, f"{key}={('nan', 'inf', '-inf')[kind]}"
