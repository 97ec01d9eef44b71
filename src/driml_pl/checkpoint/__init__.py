"""The checkpoint wing: the on-disk unit (`format`), the callback that writes and restores it (`callback`), and the
resume pre-flight and paths (`resume`). It sits above the data wing and reads the stream through its public API."""

from driml_pl.checkpoint.callback import CheckpointConfig, RunCheckpoint
from driml_pl.checkpoint.format import CheckpointError, read_segments, write_segment
from driml_pl.checkpoint.resume import check_resumable, last_checkpoint

__all__ = ["CheckpointConfig", "CheckpointError", "RunCheckpoint", "check_resumable", "last_checkpoint",
           "read_segments", "write_segment"]  # fmt: skip
