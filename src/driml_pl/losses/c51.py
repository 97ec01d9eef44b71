"""C51 (Bellemare, Dabney & Munos 2017): the categorical projection and the distributional loss."""

from __future__ import annotations

import torch
from torch import Tensor


def categorical_projection(support: Tensor, next_probs: Tensor, returns: Tensor, discounts: Tensor) -> Tensor:
    """Project the distribution of ``returns + discounts * Z`` onto ``support`` (Bellemare et al. 2017, Alg. 1).

    Each atom ``z_j`` carrying mass ``p_j`` is moved to ``Tz_j = clamp(r + d * z_j, v_min, v_max)`` and its mass is
    split between the two neighbouring atoms of the (evenly spaced) support in proportion to proximity.
    A terminal transition (``d = 0``) therefore yields a point mass at ``clamp(r)``, split over its two neighbours.

    Args:
        support: atom values ``z``, evenly spaced and increasing.
        next_probs: probabilities of the bootstrap distribution, rows sum to 1.
        returns: n-step discounted returns.
        discounts: bootstrap discounts ``gamma**n * (1 - done)``.

    Shape:
        support: (A,); next_probs: (B, A); returns: (B,); discounts: (B,). Returns: (B, A).
    """
    num_atoms = support.shape[0]
    v_min, v_max = support[0], support[-1]
    delta = (v_max - v_min) / (num_atoms - 1)
    tz = (returns[:, None] + discounts[:, None] * support[None, :]).clamp(v_min, v_max)
    b = (tz - v_min) / delta  # fractional atom index in [0, A-1]
    lower = b.floor().clamp(0, num_atoms - 1)
    upper = (lower + 1).clamp(max=num_atoms - 1)
    upper_weight = b - lower  # 0 when b is integral: all mass stays on `lower`
    lower_weight = 1.0 - upper_weight
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(1, lower.long(), next_probs * lower_weight)
    projected.scatter_add_(1, upper.long(), next_probs * upper_weight)
    return projected


def c51_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy between a projected target distribution and predicted atom logits, per sample.

    Computed in float32 with ``log_softmax`` so that mixed precision cannot take the log of an underflowed
    probability.

    Shape:
        logits: (B, A); target_probs: (B, A). Returns: (B,).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(target_probs.float() * log_probs).sum(dim=-1)
