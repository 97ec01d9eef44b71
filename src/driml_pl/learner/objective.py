"""DRIML's objective: what one update minimises, as functions of named networks and named inputs (spec §2, §3, §6).

``loss = C51 cross-entropy + sum_t lambda_t * InfoNCE_t (+ DRIML-ada's pair loss)``. `core_losses` is pure in
tensors (no Python value that changes per update), so ``torch.compile`` traces it once; `driml_losses` adds the pair
loss, whose parameters are disjoint from the rest, so adding it to ``loss`` trains it alone. Both update runners
(`driml_pl.learner.update`) reach it through `DRIML.objective`, which looks it up in this module at every call: the
one seam a subclass extends, or a test's fault injection wraps, to change what every update computes.

To add an auxiliary loss: extend `DRIML.objective` in a subclass (or compute the term in `core_losses`), put it in
the output under its own name (it is then logged as ``train/<name>``) and add ``lambda * value`` to ``loss``; see
docs/architecture.md.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from driml_pl.adaptive import ActionPairModel, pair_permutation
from driml_pl.critic import DIMCritic
from driml_pl.losses import c51_cross_entropy, categorical_projection
from driml_pl.networks import Features, QNetwork, preprocess
from driml_pl.types import Batch


class UpdateInputs(NamedTuple):
    """Every tensor one update reads, by name (shapes as in `driml_pl.types.Batch`).

    ``perm`` is DRIML-ada's negative shuffle of the (B * K) action pairs, drawn outside the objective with a seeded
    generator (`DRIML.shuffle_generator`); the three adaptive fields are None for the other methods.
    """

    obs: Tensor
    action: Tensor
    returns: Tensor
    discount: Tensor
    next_obs: Tensor
    positive_obs: Tensor
    k: Tensor
    action_window: Tensor | None = None
    pair_valid: Tensor | None = None
    perm: Tensor | None = None

    @classmethod
    def from_batch(cls, batch: Batch, generator: torch.Generator | None = None) -> UpdateInputs:
        """The inputs of ``batch``; with DRIML-ada's fields present, the negative shuffle is drawn from
        ``generator``."""
        perm = None
        if batch.pair_valid is not None and generator is not None:
            perm = pair_permutation(batch.pair_valid, generator)
        return cls(batch.obs, batch.action, batch.returns, batch.discount, batch.next_obs, batch.positive_obs,
                   batch.k, batch.action_window, batch.pair_valid, perm)  # fmt: skip


class Networks(Protocol):
    """What the objective reads: the networks, the C51 support and the InfoNCE weights (the `DRIML` module)."""

    online: QNetwork
    target: QNetwork
    critic: DIMCritic
    pair_model: ActionPairModel | None
    support: Tensor
    lambdas: dict[str, float]
    obs_size: tuple[int, int]


def q_values(logits: Tensor, support: Tensor) -> Tensor:
    """Expected return per action. Shape: (B, A, atoms), (atoms,) -> (B, A)."""
    return (torch.softmax(logits.float(), dim=-1) * support).sum(-1)


def core_losses(
    nets: Networks,
    obs: Tensor,
    action: Tensor,
    returns: Tensor,
    discount: Tensor,
    next_obs: Tensor,
    positive_obs: Tensor,
    nce_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """C51 cross-entropy, one InfoNCE per active term, ``q_mean`` and their weighted sum ``loss`` (scalars).

    ``nce_weight`` (B,) scales each anchor's InfoNCE terms (`infonce_loss`): `driml_losses` passes 0 for an anchor
    whose effective horizon is 0 (the last transition of an episode, with no later frame in it) and 1 otherwise.
    """
    b = action.shape[0]
    rows = torch.arange(b, device=action.device)
    frames = torch.cat([obs, positive_obs]) if nets.critic.terms else obs
    features = nets.online.encoder(preprocess(frames, nets.obs_size))
    logits = nets.online.head(features.global_[:b])
    with torch.no_grad():
        _, next_logits = nets.target(preprocess(next_obs, nets.obs_size))
        next_probs = torch.softmax(next_logits.float(), dim=-1)
        greedy = (next_probs * nets.support).sum(-1).argmax(-1)  # no double-Q (spec §3)
        target = categorical_projection(nets.support, next_probs[rows, greedy], returns, discount)
    out = {"c51_loss": c51_cross_entropy(logits[rows, action], target).mean()}
    loss = out["c51_loss"]
    if nets.critic.terms:
        anchor = Features(features.local[:b], features.global_[:b])
        positive = Features(features.local[b:], features.global_[b:])
        for term, value in nets.critic(anchor, action, positive, nce_weight).items():
            out[f"nce_{term}"] = value
            loss = loss + nets.lambdas[term] * value
    with torch.no_grad():
        out["q_mean"] = q_values(logits.detach(), nets.support).mean()
    out["loss"] = loss
    return out


def driml_losses(nets: Networks, inputs: UpdateInputs, core: CoreLosses | None = None) -> dict[str, Tensor]:
    """`core_losses` (or ``core``, its compiled form) on ``inputs``, plus DRIML-ada's pair loss when it is built."""
    x = inputs
    has_future = (x.k > 0).float()  # k = 0: the positive would be s_t itself; the anchor is left out
    run = core or (lambda *args: core_losses(nets, *args))
    out = dict(run(x.obs, x.action, x.returns, x.discount, x.next_obs, x.positive_obs, has_future))
    if nets.pair_model is not None and x.action_window is not None and x.pair_valid is not None:
        out["pair_loss"] = nets.pair_model.loss(x.action_window, x.pair_valid, perm=x.perm)
        out["loss"] = out["loss"] + out["pair_loss"]
    return out


class CoreLosses(Protocol):
    """`core_losses` with its networks bound (eager or compiled)."""

    def __call__(
        self, obs: Tensor, action: Tensor, returns: Tensor, discount: Tensor, next_obs: Tensor,
        positive_obs: Tensor, nce_weight: Tensor | None = None,
    ) -> dict[str, Tensor]: ...  # fmt: skip


def compile_core(nets: Networks, mode: str) -> CoreLosses:
    """``torch.compile`` of `core_losses` with ``nets`` bound (traced once, at the first update)."""

    def bound(obs: Tensor, action: Tensor, returns: Tensor, discount: Tensor, next_obs: Tensor,
              positive_obs: Tensor, nce_weight: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
        return core_losses(nets, obs, action, returns, discount, next_obs, positive_obs, nce_weight)

    compiled: CoreLosses = torch.compile(bound, mode=mode)
    return compiled
