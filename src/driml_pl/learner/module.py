"""The DRIML LightningModule: C51 on a Nature-DQN encoder plus lambda-weighted InfoNCE terms (spec §2, §3, §6).

The module holds the networks (``online``, ``target``, ``actor``, ``critic``, DRIML-ada's ``pair_model``) and wires
Lightning's hooks to the rooms that do the work:

* `driml_pl.learner.objective`: what an update minimises (`driml_losses`, on named `UpdateInputs`);
* `driml_pl.learner.update`: the update body, run op by op (`EagerUpdate`) or captured (`CapturedUpdate`);
* `driml_pl.learner.actor`: the actors' snapshot the data stream acts with (`ActorSnapshot`);
* `driml_pl.learner.metrics` and `driml_pl.learner.logs`: device-side sums, read back and logged on logging steps;
* `driml_pl.learner.guard`: the finite-loss guard (exit code 3).

Manual optimisation: `training_step` runs the `data.updates_per_batch` updates of one Lightning step, each one
`update` (run the update, sync the target every ``target_update_interval`` updates, record its metrics row). The hot
loop reads nothing back to the host but the acting argmax Procgen needs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from driml_pl.adaptive import ActionPairModel
from driml_pl.critic import TERMS, DIMCritic
from driml_pl.envs import NUM_ACTIONS, spec
from driml_pl.learner import guard
from driml_pl.learner import objective as objectives
from driml_pl.learner.actor import ActorSnapshot
from driml_pl.learner.graphs import GRAPH_COMPILE_MODES, GRAPH_PRECISIONS, StepAdam
from driml_pl.learner.logs import TrainLogs, log_eval
from driml_pl.learner.metrics import DeviceMetrics
from driml_pl.learner.objective import CoreLosses, UpdateInputs, compile_core, q_values
from driml_pl.learner.probe import probe
from driml_pl.learner.update import CapturedUpdate, EagerUpdate, main_parameters
from driml_pl.networks import QNetwork, preprocess
from driml_pl.remap import effective_actions, visible_mask
from driml_pl.types import Batch, StepBatch

# batches from the replay are already on the learner's device; the module's transfer hook (below) says so
warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule`")
# training_step fetches its own batch (see its docstring) and consumes the iterator once per step, as Lightning asks
warnings.filterwarnings("ignore", message="You are using the `dataloader_iter` step flavor")
warnings.filterwarnings("ignore", message="Found `dataloader_iter` argument in the `training_step`")
# printed by torch's own compiler (inductor) while compiling the loss; nothing a user can act on
warnings.filterwarnings("ignore", message=r"`torch._prims_common.check` is deprecated", category=FutureWarning)

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
        critic_terms: InfoNCE terms whose critic heads are built even where their lambda is 0 (computed and logged
            as ``train/nce_<term>``, weighted 0). Default: only the terms with a lambda != 0. ``fit --fork`` sets it
            when a fork turns a term off, so the checkpoint's critic still loads (docs/running.md, "Forking a run").
        probe: on logging steps, also log ``probe/*``: each loss term's gradient norm over the encoder and its
            cosine with C51's, the Q-values' action gap and the greedy actions' distribution on the step's last
            minibatch (`driml_pl.learner.probe`). Measured apart from the update: the run trains bitwise alike.
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
        critic_terms: list[str] | None = None,
        probe: bool = False,
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
        if matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(
                f"model.matmul_precision={matmul_precision!r} is not allowed; valid: highest, high, medium"
            )
        unknown = sorted(set(critic_terms or ()) - set(TERMS))
        if unknown:
            raise ValueError(f"model.critic_terms={list(critic_terms or ())} is not allowed: {', '.join(unknown)} is "
                             f"not a term; valid: {', '.join(TERMS)}")  # fmt: skip
        self.save_hyperparameters()
        self.automatic_optimization = False  # the update is spelled out in `driml_pl.learner.update`
        self.lambdas = {t: float(getattr(self.hparams, f"lambda_{t}")) for t in TERMS}
        self.obs_size: tuple[int, int] = (int(obs_size[0]), int(obs_size[1]))
        self.support: Tensor
        self.lr, self.adam_eps, self.max_grad_norm = lr, adam_eps, max_grad_norm
        self.target_update_interval = target_update_interval
        # Procgen's layout (`driml_pl.envs.procgen.SPEC`); the datamodule checks its env's against these at setup
        self.num_actions, self.frame_channels = NUM_ACTIONS, spec().frame_shape[2]
        self.online = QNetwork(self.frame_channels * frame_stack, self.obs_size, feature_dim, NUM_ACTIONS, num_atoms)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        # the actors' snapshot of the online network, refreshed once per Lightning step (`ActorSnapshot.refresh`);
        # saved in checkpoints so a resumed run acts exactly as the uninterrupted one
        self.actor = copy.deepcopy(self.online).requires_grad_(False)
        enc = self.online.encoder
        self.critic = DIMCritic(
            tuple(t for t, lam in self.lambdas.items() if lam != 0.0 or t in (critic_terms or ())),
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
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms), persistent=False)
        self.matmul_precision = matmul_precision
        self._compile, self._compile_mode = compile, compile_mode
        self._compiled: CoreLosses | None = None  # `compile_core`, built at the first update
        self._cuda_graphs = cuda_graphs
        self._probe = probe
        self.acting = ActorSnapshot(self, cuda_graphs)  # what the data stream is bound to
        self.runner: EagerUpdate | CapturedUpdate = CapturedUpdate() if cuda_graphs else EagerUpdate()
        self.clipped: list[nn.Parameter] = []  # set by configure_optimizers
        self._pair_generator: torch.Generator | None = None  # draws DRIML-ada's negative shuffles, on the device
        self.metrics = DeviceMetrics()
        self.logs = TrainLogs()
        self._last_good_step: int | None = None  # global_step of the last checkpoint saved or resumed from

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
            if self.trainer.world_size > 1:
                self.runner = EagerUpdate()
                rank_zero_warn(
                    "model.cuda_graphs under DDP captures the acting only; the update runs op by op (the gradient "
                    "all-reduce is not captured)"
                )

    # ------------------------------------------------------------------------------------------ the update
    def core(self) -> CoreLosses | None:
        """The compiled `core_losses` with ``model.compile`` (built at the first update, once the module is on its
        device), else None (the objective then runs eagerly)."""
        if not self._compile:
            return None
        if self._compiled is None:
            mode = self._compile_mode
            if mode == "auto":
                mode = "reduce-overhead" if self.device.type == "cuda" and not self._cuda_graphs else "default"
            self._compiled = compile_core(self, mode)
        return self._compiled

    def compiled_in_cuda_graphs(self) -> bool:
        """Whether the compiled objective runs inductor's own CUDA graphs (their steps must be marked)."""
        return self._compiled is not None and self.device.type == "cuda" and not self._cuda_graphs

    def training_step(self, dataloader_iter: Iterator[Any]) -> None:
        """The updates of one Lightning step (`data.updates_per_batch` minibatches, in order), then the logs.

        The step fetches its own batch (Lightning's ``dataloader_iter`` form): Lightning would otherwise fetch one
        batch ahead within an epoch but not across epochs, and the actors' policy lag would depend on where epochs
        end. Fetched here, the env steps that feed step j always act with the weights after step j - 2.
        """
        batch, _, _ = next(dataloader_iter)  # StopIteration ends the epoch
        minibatches: StepBatch = self.transfer_batch_to_device(batch, self.device, 0)
        for minibatch in minibatches:
            self.update(minibatch)
        stats = minibatches[-1].stats
        if stats.last:
            self.trainer.should_stop = True  # the budget is spent: this step's metrics are written too
        logging = self.trainer._logger_connector.should_update_logs
        if logging or self.device.type == "cpu":  # a read back stalls a GPU; on the CPU it costs nothing
            self.check_finite()
        if logging:
            self.logs.log(self, self.metrics.read_and_reset(), stats)
            if self._probe:
                values = probe(self, UpdateInputs.from_batch(minibatches[-1]))
                self.log_dict(values, batch_size=1, sync_dist=self.trainer.world_size > 1)

    def update(self, batch: Batch) -> None:
        """One update (`driml_pl.learner.update`), the target sync, and its metrics row."""
        optimizer = self.optimizers()
        assert isinstance(optimizer, pl.core.optimizer.LightningOptimizer)
        inputs = UpdateInputs.from_batch(batch, self.shuffle_generator() if self.pair_model is not None else None)
        out, values, counts = self.runner(self, inputs, optimizer)
        if self.global_step % self.target_update_interval == 0:
            self.sync_target()
        # global_step now counts this update: it is update N
        self.metrics.add_row([*out, "horizon/k_mean"], values, counts, self.global_step)

    def objective(self, inputs: UpdateInputs) -> dict[str, Tensor]:
        """What one update minimises, as named scalars with their weighted sum under ``loss`` (every key is logged
        as ``train/<key>``). Both update runners call it; a subclass adds a term by extending it
        (docs/architecture.md)."""
        return objectives.driml_losses(self, inputs, self.core())

    def shuffle_generator(self) -> torch.Generator:
        """The generator of this update's negative shuffle, seeded from (run seed, update count): a resumed run draws
        what an uninterrupted one does, and runs with different seeds draw differently."""
        if self._pair_generator is None or self._pair_generator.device != self.device:
            self._pair_generator = torch.Generator(device=self.device)
        seed = np.random.SeedSequence([self.seed, self.global_step]).generate_state(1)[0]
        return self._pair_generator.manual_seed(int(seed))

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """The objective on ``batch`` without an update (for tests and diagnostics)."""
        generator = self.shuffle_generator() if self.pair_model is not None else None
        return self.objective(UpdateInputs.from_batch(batch, generator))

    def sync_target(self) -> None:
        """Hard copy of the online network into the target network."""
        self.target.load_state_dict(self.online.state_dict())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the online network and critic; DRIML-ada's pair network is a second parameter group.

        Adam keeps no state across parameters, so a separate group with the same settings is exactly "its own Adam"
        (spec §2.6) while Lightning keeps counting one optimizer step per update; it is also left out of clipping.
        """
        self.clipped = main_parameters(self, self.pair_model)  # the same Parameter objects for the whole run
        if isinstance(self.runner, CapturedUpdate):  # a graph captured with an earlier optimizer would step its state
            self.runner = CapturedUpdate()
        groups: list[dict[str, Any]] = [{"params": self.clipped}]
        if self.pair_model is not None:
            groups.append({"params": list(self.pair_model.parameters())})
        # one fused kernel updates every parameter, on the GPU and the CPU alike, so CPU runs and tests use the GPU's
        # code path; the loop version reads each parameter's step count back to the host (a sync per parameter on a
        # GPU). Same update rule: after 20 steps the two differ by at most 3e-8; CPU speed at the paper's size is
        # the same (5.1 DRIML updates/s with either)
        return StepAdam(groups, lr=self.lr, eps=self.adam_eps, fused=True)

    # ------------------------------------------------------------------------------------------------ acting
    def q_values(self, logits: Tensor) -> Tensor:
        """Expected return per action. Shape: (B, A, atoms) -> (B, A)."""
        return q_values(logits, self.support)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Greedy actions of the online network for uint8 frame stacks (N, S, 64, 64, 3); stays on the device
        (evaluation acts with it: the paper's protocol)."""
        x = preprocess(obs.to(self.device, non_blocking=True), self.obs_size)
        _, logits = self.online(x)
        return self.q_values(logits).argmax(-1)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A replay on the learner's device hands out minibatches that are already there: skip Lightning's generic
        walk over them (a third of a millisecond per update)."""
        if isinstance(batch, Batch):  # (a NamedTuple, so tested before plain tuples)
            return (_to_device(batch, device),)
        if isinstance(batch, tuple) and all(isinstance(b, Batch) for b in batch):
            return tuple(_to_device(b, device) for b in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -------------------------------------------------------------------------------------- numerical faults
    def check_finite(self, all_ranks: bool = False) -> None:
        """Raise `NonFiniteLossError` if a loss term of any update so far was NaN or Inf (`driml_pl.learner.guard`);
        ``all_ranks`` takes the earliest fault over every DDP rank (a collective)."""
        guard.check_finite(self.metrics, self.trainer, self.device, self._last_good_step, all_ranks)

    def nonfinite_update(self) -> int | None:
        """The first update of this rank with a non-finite loss term, or None (one device -> host read)."""
        code = guard.first_fault(self.metrics, self.device, all_ranks=False)
        return None if code == guard.NO_FAULT else self.metrics.describe(code)[0]

    def configure_callbacks(self) -> list[Callback]:
        return [guard.FiniteLossGuard(self)]

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last_good_step = int(checkpoint["global_step"])  # the guard has checked the losses
        # the sums since the last log: a resumed run logs the same means as the uninterrupted one
        checkpoint["driml_metrics"] = self.metrics.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last_good_step = int(checkpoint.get("global_step", 0))
        if "driml_metrics" in checkpoint:
            self.metrics.load_state_dict(checkpoint["driml_metrics"])
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

    def on_train_epoch_end(self) -> None:
        stream = getattr(getattr(self.trainer, "datamodule", None), "stream", None)
        if stream is not None and stream.exhausted:  # an epoch that ended on a spent budget without a last batch
            self.trainer.should_stop = True

    # -------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        log_eval(self, "eval", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        log_eval(self, "test", batch)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if batch.obs.device == device:
        return batch
    moved: list[Any] = [x.to(device, non_blocking=True) if isinstance(x, Tensor) else x for x in batch]
    return Batch(*moved)
