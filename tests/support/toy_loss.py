"""docs/architecture.md's first recipe, followed to the letter: a toy auxiliary loss with its own lambda.

`ToyDRIML` adds ``lambda_toy`` (a ``model.lambda_toy`` config key through the CLI) and one term, ``toy_loss``: the
mean squared norm of the online encoder's global features of s_t, a stand-in for a real auxiliary loss.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from driml_pl.learner import DRIML
from driml_pl.learner.objective import UpdateInputs
from driml_pl.networks import preprocess


def toy_loss(features: Tensor) -> Tensor:
    """Mean squared L2 norm of (B, D) features. Shape: (B, D) -> ()."""
    return features.float().pow(2).sum(-1).mean()


class ToyDRIML(DRIML):
    """DRIML with one more term in its objective.

    Args:
        lambda_toy: weight of ``toy_loss`` in the total loss.
    """

    def __init__(self, lambda_toy: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lambda_toy = lambda_toy

    def objective(self, inputs: UpdateInputs) -> dict[str, Tensor]:
        out = super().objective(inputs)
        features = self.online.encoder(preprocess(inputs.obs, self.obs_size)).global_
        out["toy_loss"] = toy_loss(features)
        out["loss"] = out["loss"] + self.lambda_toy * out["toy_loss"]
        return out
