"""Pure loss functions: no modules, no state, shapes documented on each function."""

from driml_pl.losses.c51 import c51_cross_entropy, categorical_projection
from driml_pl.losses.infonce import infonce_loss, soft_clip

__all__ = ["c51_cross_entropy", "categorical_projection", "infonce_loss", "soft_clip"]
