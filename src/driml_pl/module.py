"""The DRIML LightningModule: C51 on a Nature-DQN encoder plus lambda-weighted InfoNCE terms (spec §2, §3, §6)."""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from driml_pl.adaptive import ActionPairModel
from driml_pl.critic import TERMS, DIMCritic
from driml_pl.envs import NUM_ACTIONS
from driml_pl.losses import c51_cross_entropy, categorical_projection
from driml_pl.networks import Features, QNetwork, preprocess
from driml_pl.remap import effective_actions
from driml_pl.types import Batch

K_LOGGED = 13  # horizons logged one by one (the paper's cap for DRIML-ada)


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
        pair_hidden: hidden width of the action-pair network (64).
        horizon_decay: EMA factor of the continuation matrix, A <- decay * A + (1 - decay) * softmax(Q) (0.9).
        continuation_eps: continuation probabilities are clipped to [eps, 1 - eps] (0.05).
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
        pair_hidden: int = 64,
        horizon_decay: float = 0.9,
        continuation_eps: float = 0.05,
    ) -> None:
        super().__init__()
        if not v_min < v_max or num_atoms < 2:
            raise ValueError(f"need v_min < v_max and num_atoms >= 2, got {v_min}, {v_max}, {num_atoms}")
        if target_update_interval < 1:
            raise ValueError(f"model.target_update_interval must be >= 1, got {target_update_interval}")
        self.save_hyperparameters()
        self.lambdas = {t: float(getattr(self.hparams, f"lambda_{t}")) for t in TERMS}
        self.obs_size: tuple[int, int] = (int(obs_size[0]), int(obs_size[1]))
        self.support: Tensor
        self.lr, self.adam_eps, self.max_grad_norm = lr, adam_eps, max_grad_norm
        self.target_update_interval = target_update_interval
        self.online = QNetwork(3 * frame_stack, self.obs_size, feature_dim, NUM_ACTIONS, num_atoms)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
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
            visible = torch.zeros(NUM_ACTIONS, dtype=torch.bool)
            visible[torch.from_numpy(effective_actions(game))] = True
            self.pair_model = ActionPairModel(pair_hidden, horizon_decay, continuation_eps, visible=visible)
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms), persistent=False)
        self._perf: deque[tuple[float, int, int]] = deque(maxlen=100)
        self._clipped: list[nn.Parameter] = []  # set by configure_optimizers

    # ------------------------------------------------------------------------------------------------ acting
    def q_values(self, logits: Tensor) -> Tensor:
        """Expected return per action. Shape: (B, A, atoms) -> (B, A)."""
        return (torch.softmax(logits.float(), dim=-1) * self.support).sum(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions of the online network for uint8 frame stacks (N, S, 64, 64, 3)."""
        x = preprocess(torch.from_numpy(obs).to(self.device), self.obs_size)
        _, logits = self.online(x)
        return self.q_values(logits).argmax(-1).cpu().numpy()

    # ---------------------------------------------------------------------------------------------- learning
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """C51 cross-entropy, one InfoNCE per active term, and diagnostics (all scalars)."""
        b = batch.action.shape[0]
        rows = torch.arange(b, device=batch.action.device)
        frames = torch.cat([batch.obs, batch.positive_obs]) if self.critic.terms else batch.obs
        features = self.online.encoder(preprocess(frames, self.obs_size))
        logits = self.online.head(features.global_[:b])
        with torch.no_grad():
            _, next_logits = self.target(preprocess(batch.next_obs, self.obs_size))
            next_probs = torch.softmax(next_logits.float(), dim=-1)
            greedy = (next_probs * self.support).sum(-1).argmax(-1)  # no double-Q (spec §3)
            target = categorical_projection(self.support, next_probs[rows, greedy], batch.returns, batch.discount)
        out = {"c51_loss": c51_cross_entropy(logits[rows, batch.action], target).mean()}
        if self.critic.terms:
            anchor = Features(features.local[:b], features.global_[:b])
            positive = Features(features.local[b:], features.global_[b:])
            for term, value in self.critic(anchor, batch.action, positive).items():
                out[f"nce_{term}"] = value
        with torch.no_grad():
            out["q_mean"] = self.q_values(logits.detach()).mean()
        out["loss"] = out["c51_loss"] + sum(
            (self.lambdas[t] * out[f"nce_{t}"] for t in self.critic.terms), torch.zeros((), device=self.device)
        )
        if self.pair_model is not None and batch.action_window is not None and batch.pair_valid is not None:
            # The pair network's parameters are disjoint from the rest, so adding its loss trains it alone.
            shuffle = torch.Generator().manual_seed(self.global_step)
            out["pair_loss"] = self.pair_model.loss(batch.action_window, batch.pair_valid, shuffle)
            out["loss"] = out["loss"] + out["pair_loss"]
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.losses(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}, prog_bar=False)
        self.log("train/loss", out["loss"].detach())
        self._log_horizon(batch)
        self._log_rollout(batch)
        return out["loss"]

    def _log_horizon(self, batch: Batch) -> None:
        """Batch-mean k, the share of each k (compare the paper's figure: mean k about 1.3-3.1 for DRIML-ada) and,
        for the adaptive mode, the continuation probabilities."""
        k = batch.k
        self.log("horizon/k_mean", k.float().mean())
        # a fixed key set (k = 0..13, then "over"): Lightning's logging needs the same keys at every step
        counts = torch.bincount(k.clamp(max=K_LOGGED + 1), minlength=K_LOGGED + 2).float() / k.numel()
        fractions = {f"horizon/k_frac_{j}": counts[j] for j in range(K_LOGGED + 1)}
        fractions[f"horizon/k_frac_over{K_LOGGED}"] = counts[K_LOGGED + 1]
        self.log_dict(fractions)
        if self.pair_model is not None:
            probs = self.pair_model.continuation()
            visible = self.pair_model.visible
            block = probs[visible][:, visible]
            self.log("horizon/continuation_mean", block.mean())
            self.log("horizon/continuation_repeat", block.diagonal().mean())
            self.log("horizon/continuation_max", block.max())

    def _log_rollout(self, batch: Batch) -> None:
        stats, world = batch.stats, self.trainer.world_size
        env_steps = int(stats.env_steps) * world
        self.log("rollout/env_steps", float(env_steps), prog_bar=True, reduce_fx="max")
        self.log("rollout/epsilon", float(stats.epsilon))
        # env steps are exact globally (every rank steps alike); episode statistics are this rank's (rank 0 logs)
        self.log("rollout/episodes", float(stats.episodes))
        if not math.isnan(stats.episode_return):
            self.log("rollout/episode_return", float(stats.episode_return), prog_bar=True)
            self.log("rollout/episode_length", float(stats.episode_length))
        now = time.perf_counter()
        self._perf.append((now, env_steps, self.global_step))
        t0, e0, u0 = self._perf[0]
        if now > t0:
            self.log("perf/env_steps_per_s", (env_steps - e0) / (now - t0), prog_bar=True)
            self.log("perf/updates_per_s", (self.global_step - u0) / (now - t0))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.pair_model is not None:
            self.pair_model.update_matrix()
        if self.global_step % self.target_update_interval == 0:
            self.sync_target()

    def continuation_matrix(self) -> np.ndarray:
        """DRIML-ada's current continuation probabilities (15, 15), read by the replay stream."""
        assert self.pair_model is not None, "only built with adaptive_horizon=true"
        return self.pair_model.continuation().cpu().numpy()

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
        groups: list[dict[str, Any]] = [{"params": self._clipped}]
        if self.pair_model is not None:
            groups.append({"params": list(self.pair_model.parameters())})
        return torch.optim.Adam(groups, lr=self.lr, eps=self.adam_eps)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        # The clip is part of the algorithm (spec §3: global norm 10 over the DRIML parameters), so it lives here
        # rather than in the Trainer flags. Precision plugins have already unscaled the gradients at this point.
        nn.utils.clip_grad_norm_(self._clipped, self.max_grad_norm)

    # -------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_eval("eval", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_eval("test", batch)

    def _log_eval(self, prefix: str, batch: dict[str, Tensor]) -> None:
        returns = batch["episode_return"].double()
        if returns.numel():
            self.log(f"{prefix}/episode_return", returns.mean().item(), batch_size=returns.numel())
            self.log(f"{prefix}/episode_length", batch["episode_length"].double().mean().item())
        self.log(f"{prefix}/episodes", float(returns.numel()))
