"""The learner wing: the `DRIML` LightningModule and the rooms it wires (objective, update, actor, metrics, guard,
logs, graphs)."""

from driml_pl.learner.guard import NonFiniteLossError
from driml_pl.learner.module import DRIML

__all__ = ["DRIML", "NonFiniteLossError"]
