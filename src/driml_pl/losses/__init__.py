"""Pure loss functions: no modules, no state, shapes documented on each function."""

from driml_pl.losses.c51 import c51_cross_entropy, categorical_projection
from driml_pl.losses.infonce import infonce_loss, soft_clip
from driml_pl.losses.jsd import jsd_mi_loss

__all__ = ["c51_cross_entropy", "categorical_projection", "infonce_loss", "jsd_mi_loss", "soft_clip"]
