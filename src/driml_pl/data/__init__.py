"""The data wing: Procgen envs are stepped by the `Collector` into the `FrameReplay`, the `ReplayStream` samples it for
the learner, `DRIMLDataModule` builds them per rank, and `driml_pl.data.evaluation` plays evaluation episodes."""

from driml_pl.data.datamodule import DRIMLDataModule
from driml_pl.data.stream import ReplayStream

__all__ = ["DRIMLDataModule", "ReplayStream"]
