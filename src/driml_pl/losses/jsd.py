"""The Jensen-Shannon MI estimator DRIML-ada's action-pair network is trained with (spec §2.6; Deep InfoMax's JSD
form)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def jsd_mi_loss(
    positive: Tensor, negative: Tensor, positive_mask: Tensor | None = None, negative_mask: Tensor | None = None
) -> Tensor:
    """Negative Jensen-Shannon MI lower bound (Deep InfoMax's JSD form), to minimise.

    Maximised quantity: E_pos[log 2 - softplus(-Q)] - E_neg[softplus(-Q) + Q - log 2]. The masks select the scores
    that count (the means run over them; an empty side contributes 0), without a data-dependent shape.

    Shape:
        positive: (P,) scores of real pairs; negative: (N,) scores of shuffled pairs; masks: (P,), (N,) bool.
        Returns: scalar.
    """
    e_pos = _masked_mean(math.log(2.0) - F.softplus(-positive), positive_mask)
    e_neg = _masked_mean(F.softplus(-negative) + negative - math.log(2.0), negative_mask)
    return -(e_pos - e_neg)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1)
