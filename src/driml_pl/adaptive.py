"""DRIML-ada's learned action-pair concordance (spec §2.6, paper Algorithm 2).

An action-pair network Q scores how strongly an action tends to follow another; it is trained with the Jensen-Shannon
MI estimator on real consecutive pairs (positives) against pairs whose second action is shuffled (negatives). After
every update the continuation matrix is smoothed, ``A <- decay * A + (1 - decay) * map(Q)``, and the horizon sampler
reads ``clip(A, eps, 1 - eps)``. ``map`` is one of `CONTINUATION_MAPS`:

* ``softmax``: a row softmax over the game's effective actions (the paper's description and the released code). Each
  row sums to 1, so the mean continuation probability is about 1 / N for N effective actions, whatever the policy.
* ``sigmoid``: ``sigmoid(Q)``. The JSD objective is a logistic classifier of real against shuffled pairs, so at its
  optimum ``sigmoid(Q(a, a')) = p(a, a') / (p(a, a') + p(a) p(a'))``: 1/2 for a pair that follows by chance, towards
  1 for a pair the policy chains more often than chance. It does not shrink with the number of actions.

Actions are *effective* ids (raw Procgen actions mapped through the game's remap matrix, `driml_pl.remap`), so
redundant key presses count as the same behaviour. The released code indexed A with a "hybrid" id that is not a
bijection (spec §8.8); this is the paper's description instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from driml_pl.envs import NUM_ACTIONS
from driml_pl.losses.jsd import jsd_mi_loss
from driml_pl.networks import one_hot

CONTINUATION_MAPS = ("softmax", "sigmoid")


def pair_permutation(pair_valid: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The negative shuffle pi of `ActionPairModel.loss`: a permutation of the (B * K) pair slots."""
    return torch.randperm(pair_valid.numel(), generator=generator, device=pair_valid.device)


class ActionPairModel(nn.Module):
    """The pair network and the smoothed continuation matrix A (a persistent buffer, saved in checkpoints).

    Args:
        hidden: hidden width of the pair MLP (paper: 64).
        decay: EMA factor of A (paper: 0.9).
        eps: continuation probabilities are clipped to [eps, 1 - eps].
        seed: seed of A's Uniform(0, 1) initialisation (the module passes the run's seed).
        visible: (15,) bool mask of the game's effective actions; the row softmax runs over these columns only.
        mapping: how scores become continuation probabilities, one of `CONTINUATION_MAPS`.
    """

    def __init__(
        self,
        hidden: int = 64,
        decay: float = 0.9,
        eps: float = 0.05,
        seed: int = 0,
        visible: Tensor | None = None,
        mapping: str = "sigmoid",
    ) -> None:
        super().__init__()
        if not 0.0 < eps < 0.5:
            raise ValueError(f"model.continuation_eps must be in (0, 0.5), got {eps}")
        if mapping not in CONTINUATION_MAPS:
            raise ValueError(
                f"model.continuation_map={mapping!r} is not allowed; valid: {', '.join(CONTINUATION_MAPS)}"
            )
        self.decay, self.eps, self.mapping = decay, eps, mapping
        self.net = nn.Sequential(nn.Linear(2 * NUM_ACTIONS, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("matrix", torch.rand(NUM_ACTIONS, NUM_ACTIONS, generator=gen))
        mask = torch.ones(NUM_ACTIONS, dtype=torch.bool) if visible is None else visible.bool()
        self.register_buffer("visible", mask, persistent=False)
        # clip(A) as of the last `snapshot_continuation`: what the data stream samples horizons with
        self.register_buffer("continuation_snapshot", self.matrix.clamp(eps, 1.0 - eps))
        self.matrix: Tensor
        self.visible: Tensor
        self.continuation_snapshot: Tensor

    def score(self, first: Tensor, second: Tensor) -> Tensor:
        """Q(a, a') for pairs of effective action ids. Shape: (N,), (N,) -> (N,)."""
        x = torch.cat([one_hot(first, NUM_ACTIONS), one_hot(second, NUM_ACTIONS)], dim=-1)
        return self.net(x).squeeze(-1)

    def loss(
        self,
        actions: Tensor,
        pair_valid: Tensor,
        generator: torch.Generator | None = None,
        perm: Tensor | None = None,
    ) -> Tensor:
        """JSD loss on the consecutive pairs of the sampled windows; negatives shuffle the second actions.

        Every pair slot of the batch is scored and the invalid ones are masked out (no boolean indexing, so no
        device-to-host sync): positive i is ``(first_i, second_i)``, negative i is ``(first_i, second_pi(i))`` for a
        random permutation pi of the slots, counted when both slots are valid pairs. ``generator`` (on the actions'
        device) draws pi; the module seeds it from the run's seed and the update count, so a resumed run draws the
        same negatives as an uninterrupted one. ``perm`` gives pi instead (the captured update draws it outside its
        graph, with the same generator: `pair_permutation`).

        Shape:
            actions: (B, K + 1) effective ids; pair_valid: (B, K). Returns: scalar.
        """
        first, second, valid = actions[:, :-1].reshape(-1), actions[:, 1:].reshape(-1), pair_valid.reshape(-1)
        if perm is None:
            perm = pair_permutation(pair_valid, generator)
        return jsd_mi_loss(self.score(first, second), self.score(first, second[perm]), valid, valid & valid[perm])

    @torch.no_grad()
    def update_matrix(self) -> None:
        """A <- decay * A + (1 - decay) * map(Q): a row softmax over the game's effective actions, or sigmoid(Q)."""
        ids = torch.arange(NUM_ACTIONS, device=self.matrix.device)
        first, second = torch.meshgrid(ids, ids, indexing="ij")
        q = self.score(first.reshape(-1), second.reshape(-1)).view(NUM_ACTIONS, NUM_ACTIONS)
        if self.mapping == "softmax":
            mapped = torch.softmax(q.masked_fill(~self.visible[None, :], float("-inf")), dim=1)
        else:
            mapped = torch.sigmoid(q) * self.visible[None, :]
        self.matrix.mul_(self.decay).add_((1.0 - self.decay) * mapped)

    @torch.no_grad()
    def snapshot_continuation(self) -> None:
        self.continuation_snapshot.copy_(self.continuation())

    @torch.no_grad()
    def continuation(self) -> Tensor:
        """clip(A, eps, 1 - eps): the per-pair continuation probabilities the horizon sampler uses."""
        return self.matrix.clamp(self.eps, 1.0 - self.eps)
