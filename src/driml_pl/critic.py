"""The DIM critic (spec §2.3-2.5): action-conditioned anchor heads, candidate heads, and the four InfoNCE terms.

Term names read (s_t side)(s_{t+k} side): ``lg`` scores local(s_t, a_t) against global(s_{t+k}). Local terms run one
InfoNCE per spatial position, with candidates taken at the same position in the other batch elements; the global
side of a mixed term is broadcast to every position. GG is computed once (the released code repeats it 54 times).

DRIML-noact (spec §2.8; the released ``infoNCE_Mnih_84x84`` and ``InfoNCE_no_action_loss``) has its own heads per
term: LL and GG one head each, used on both sides (a symmetric critic); LG and GL a local and a global head each,
which no other term uses.

Under DDP (`DIMCritic.distribute`) every rank's candidates are gathered (with gradients flowing back to the rank that
computed them), so each anchor is scored against the global batch's candidates exactly as on one device.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from driml_pl.losses import infonce_loss, soft_clip
from driml_pl.networks import ActionEncoder, Features, ResidualMLP

# the autograd all-gather is deprecated in favour of a private module's; it is the public, tested one (see `_gather`)
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated")

TERMS: tuple[str, ...] = ("ll", "lg", "gl", "gg")
KIND_NAMES = {"l": "local", "g": "global"}


class DIMCritic(nn.Module):
    """Anchor heads Psi (with the action embedding) and candidate heads Phi, one pair per term with lambda != 0.

    Args:
        terms: the terms to build (those with a non-zero lambda).
        local_channels: channels of the local features (64).
        global_dim: width of the global features (512).
        num_actions: size of the one-hot action (15).
        action_dim: action embedding width (64).
        rkhs_dim: projection width (512).
        clip: soft-clip cap for the scores (20).
        action_conditioned: False builds the DRIML-noact ablation (spec §2.8) as the released code does: no action
            input; heads in ``noact_heads``, one per term and side kind (``ll``, ``gg``, ``lg_local``, ``lg_global``,
            ``gl_global``, ``gl_local``), so LL and GG each use one head on both sides (a symmetric critic) and no
            head is shared between terms; ``kaiming_uniform_`` (ReLU gain) init with zero biases where the
            action-conditioned heads are orthogonal (see ``ResidualMLP``). The released width is 128.
    """

    def __init__(
        self,
        terms: tuple[str, ...],
        local_channels: int = 64,
        global_dim: int = 512,
        num_actions: int = 15,
        action_dim: int = 64,
        rkhs_dim: int = 512,
        clip: float = 20.0,
        action_conditioned: bool = True,
    ) -> None:
        super().__init__()
        unknown = set(terms) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown DIM terms {sorted(unknown)}; valid: {', '.join(TERMS)}")
        self.terms = tuple(t for t in TERMS if t in terms)
        self.rkhs_dim, self.clip = rkhs_dim, clip
        self.rank, self.world_size = 0, 1  # set by `distribute` under DDP
        in_dim = {"l": local_channels, "g": global_dim}
        self.action_conditioned = action_conditioned
        if action_conditioned:
            self.action_encoder: ActionEncoder | None = ActionEncoder(num_actions, action_dim) if self.terms else None
            self.anchor_heads = nn.ModuleDict(
                {t: ResidualMLP(in_dim[t[0]] + action_dim, rkhs_dim, spatial=t[0] == "l") for t in self.terms}
            )
            self.candidate_heads = nn.ModuleDict(
                {t: ResidualMLP(in_dim[t[1]], rkhs_dim, spatial=t[1] == "l") for t in self.terms}
            )
        else:
            self.action_encoder = None
            self.noact_heads = nn.ModuleDict(
                {
                    name: ResidualMLP(in_dim[kind], rkhs_dim, spatial=kind == "l", init="kaiming")
                    for t in self.terms
                    for name, kind in _noact_head_names(t)
                }
            )

    def distribute(self, rank: int, world_size: int) -> None:
        """Score every anchor of this rank against the candidates of all ``world_size`` ranks (the global batch).

        The candidates are all-gathered with ``torch.distributed.nn.functional.all_gather``, whose backward sends each
        rank the gradients every rank's loss puts on its candidates; with DDP's averaging of the gradients the update
        equals one device's on the global batch. Every rank must then compute the loss on every update (they do).
        """
        self.rank, self.world_size = rank, world_size

    def _gather(self, v: Tensor) -> Tensor:
        """The candidates of every rank, in rank order, along the batch dim (the global batch's order)."""
        if self.world_size == 1:
            return v
        return torch.cat([_Contiguous.apply(part) for part in dist_fn.all_gather(v)], dim=0)

    def _heads(self, term: str) -> tuple[nn.Module, nn.Module]:
        if self.action_conditioned:
            return self.anchor_heads[term], self.candidate_heads[term]
        names = [name for name, _ in _noact_head_names(term)]  # one name for LL and GG: the same head on both sides
        return self.noact_heads[names[0]], self.noact_heads[names[-1]]

    def scores(self, anchor: Features, actions: Tensor, candidate: Features) -> dict[str, Tensor]:
        """Score matrices per term, soft-clipped: (P, B, B * N) for terms with a local side, (B, B * N) for GG, with N
        the world size (`distribute`): this rank's anchors against the global batch's candidates.

        Shape:
            anchor, candidate: Features of s_t and s_{t+k} (local (B, C, H, W), global (B, D)); actions: (B,).
        """
        if not self.terms:
            return {}
        inputs = {"l": anchor.local, "g": anchor.global_}
        if self.action_encoder is not None:
            emb = self.action_encoder(actions)  # (B, action_dim)
            h, w = anchor.local.shape[-2:]
            inputs = {
                "l": torch.cat([anchor.local, emb[:, :, None, None].expand(-1, -1, h, w)], dim=1),
                "g": torch.cat([anchor.global_, emb], dim=1),
            }
        targets = {"l": candidate.local, "g": candidate.global_}
        out = {}
        for term in self.terms:
            anchor_head, candidate_head = self._heads(term)
            u, v = anchor_head(inputs[term[0]]), self._gather(candidate_head(targets[term[1]]))
            out[term] = soft_clip(pairwise_scores(u, v) / math.sqrt(self.rkhs_dim), self.clip)
        return out

    def forward(
        self, anchor: Features, actions: Tensor, candidate: Features, weight: Tensor | None = None
    ) -> dict[str, Tensor]:
        """InfoNCE loss per term (scalars): the mean over this rank's anchors, whose positives are this rank's
        candidates (offset ``rank * B`` among the gathered ones); ``weight`` (B,) scales each anchor's term."""
        offset = self.rank * actions.shape[0]
        return {t: infonce_loss(s, offset, weight) for t, s in self.scores(anchor, actions, candidate).items()}


class _Contiguous(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the all-gather's backward hands the gradients to a
    collective (an all-to-all on gloo), which reads a strided gradient (here a slice of an einsum's) wrongly."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _noact_head_names(term: str) -> list[tuple[str, str]]:
    """DRIML-noact's heads of one term as (name, feature kind), s_t side first: one for LL and GG, two for LG, GL."""
    if term[0] == term[1]:
        return [(term, term[0])]
    return [(f"{term}_{KIND_NAMES[kind]}", kind) for kind in term]


def pairwise_scores(u: Tensor, v: Tensor) -> Tensor:
    """Dot products of every anchor with every candidate, per position when either side is spatial.

    Shape:
        u, v: (B, D) or (B, D, H, W). Returns: (B, B) when both are vectors, else (H*W, B, B).
    """
    if u.dim() == 2 and v.dim() == 2:
        return u @ v.t()
    if u.dim() == 4 and v.dim() == 4:
        return torch.einsum("idp,jdp->pij", u.flatten(2), v.flatten(2))
    if u.dim() == 4:
        return torch.einsum("idp,jd->pij", u.flatten(2), v)
    return torch.einsum("id,jdp->pij", u, v.flatten(2))
