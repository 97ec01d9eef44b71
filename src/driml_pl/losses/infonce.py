"""InfoNCE with in-batch negatives (van den Oord et al. 2018), as used by DRIML (spec §2.4)."""

from __future__ import annotations

import torch
from torch import Tensor


def soft_clip(scores: Tensor, cap: float) -> Tensor:
    """Soft-clip scores to ``(-cap, cap)`` with ``cap * tanh(x / cap)`` (the AM-DIM trick). ``cap <= 0`` disables it."""
    if cap <= 0:
        return scores
    return cap * torch.tanh(scores / cap)


def infonce_loss(scores: Tensor, offset: int = 0, weight: Tensor | None = None) -> Tensor:
    """Mean over leading dims and anchors of ``-log softmax_j(scores)[..., i, offset + i]``.

    ``scores[..., i, j]`` is the critic's score of anchor ``i`` against candidate ``j``; the positive pair of anchor
    ``i`` is candidate ``offset + i`` and the other ``C - 1`` candidates are its negatives. With a square matrix and
    ``offset = 0`` the positives are the diagonal; under DDP a rank scores its ``B`` anchors against the ``C``
    candidates of the global batch, its own starting at ``offset = rank * B``. With uniform scores the loss is
    ``log C``. Leading dims (e.g. spatial positions for local terms) are independent softmaxes.

    ``weight`` scales each anchor's term; the mean still divides by ``B`` (not by the weights' sum), so a 0 drops an
    anchor without changing the others' weight, and under DDP the ranks' means still average to the global batch's.

    Shape:
        scores: (..., B, C) with ``offset + B <= C``; weight: (B,). Returns: scalar.
    """
    b, c = scores.shape[-2:]
    if not 0 <= offset <= c - b:
        raise ValueError(f"{b} anchors from offset {offset} do not fit {c} candidates")
    log_probs = torch.log_softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    positives = torch.diagonal(log_probs, offset=offset, dim1=-2, dim2=-1)  # (..., B)
    if weight is not None:
        positives = positives * weight
    return -positives.mean()
