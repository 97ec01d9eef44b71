"""InfoNCE with in-batch negatives (van den Oord et al. 2018), as used by DRIML (spec §2.4)."""

from __future__ import annotations

import torch
from torch import Tensor


def soft_clip(scores: Tensor, cap: float) -> Tensor:
    """Soft-clip scores to ``(-cap, cap)`` with ``cap * tanh(x / cap)`` (the AM-DIM trick). ``cap <= 0`` disables it."""
    if cap <= 0:
        return scores
    return cap * torch.tanh(scores / cap)


def infonce_loss(scores: Tensor) -> Tensor:
    """Mean over leading dims and anchors of ``-log softmax_j(scores)[..., i, i]``.

    ``scores[..., i, j]`` is the critic's score of anchor ``i`` against candidate ``j``; the positive pair of anchor
    ``i`` is candidate ``i`` (the diagonal) and the other ``B - 1`` candidates are its negatives. With uniform scores
    the loss is ``log B``. Leading dims (e.g. spatial positions for local terms) are independent softmaxes.

    Shape:
        scores: (..., B, B). Returns: scalar.
    """
    log_probs = torch.log_softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return -torch.diagonal(log_probs, dim1=-2, dim2=-1).mean()
