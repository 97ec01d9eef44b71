"""Where a run's checkpoint is, and whether it can be resumed: checked before anything is printed or written.

`last_checkpoint` is the one place that knows the layout (``<run>/checkpoints/last.ckpt``). `check_resumable` loads
the file without unpickling code and checks that the unit it names is complete and was written with settings this
run shares; `unit_pointer` reads the unit a checkpoint commits (also from checkpoints written before the pointer
moved out of the data module's state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from driml_pl.checkpoint import format
from driml_pl.checkpoint.format import CheckpointError

UNIT_KEY = "driml_unit"  # the unit pointer in last.ckpt
LEGACY_UNIT_KEY = "DRIMLDataModule"  # where checkpoints written before the checkpoint package kept it


def checkpoint_dir(root: str | Path) -> Path:
    """The run directory's checkpoint folder."""
    return Path(root) / "checkpoints"


def last_checkpoint_in(directory: str | Path) -> Path:
    """The commit point of the checkpoint unit in a checkpoint folder."""
    return Path(directory) / "last.ckpt"


def last_checkpoint(root: str | Path) -> Path:
    """``<run>/checkpoints/last.ckpt``: what ``--ckpt_path last`` resumes."""
    return last_checkpoint_in(checkpoint_dir(root))


def resume_path(ckpt_path: str, root: str | Path) -> Path | None:
    """The file ``fit --ckpt_path`` names: ``last`` is the run directory's own, None when it has none yet
    (Lightning then warns and starts afresh)."""
    if ckpt_path != "last":
        return Path(ckpt_path)
    path = last_checkpoint(root)
    return path if path.exists() else None


def unit_pointer(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``{"world_size", "global_step", "updates", "unit"}`` of a loaded ``last.ckpt``."""
    return checkpoint.get(UNIT_KEY) or checkpoint.get(LEGACY_UNIT_KEY) or {}


def check_resumable(ckpt_path: Path, meta: dict[str, Any]) -> None:
    """Before anything is written: ``ckpt_path`` loads without unpickling code, names a complete unit, and that unit
    was written with the same settings (``meta``: config key -> value). Raises `CheckpointError` naming the file or
    the key. The replay segments' CRCs are checked while they are read."""
    if not ckpt_path.is_file():
        raise CheckpointError(f"checkpoint file {ckpt_path} is missing")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to load is reported the same way
        pickled = "weights_only" in str(err)
        reason = "it holds pickled objects, which are not loaded" if pickled else "truncated or corrupt"
        raise CheckpointError(f"checkpoint file {ckpt_path} cannot be loaded: {reason}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint file {ckpt_path} is not a driml_pl checkpoint")
    state = unit_pointer(checkpoint)
    unit, world = state.get("unit"), state.get("world_size")
    if not unit:
        raise CheckpointError(f"checkpoint file {ckpt_path} has no stream state (written by an older driml_pl)")
    if meta.get("world_size") is not None and world != meta["world_size"]:
        raise CheckpointError(
            f"trainer.devices x num_nodes={meta.get('world_size')} does not fit the checkpoint {ckpt_path}, written "
            f"with {world} ranks"
        )
    for rank in range(int(world or 0)):
        document = format.read_state(ckpt_path.parent / "units" / unit / f"rank{rank}" / "state.json")
        format.check_segment_sizes(ckpt_path.parent / "replay" / f"rank{rank}", document["replay"])
        format.check_meta({k: v for k, v in document["meta"].items() if k != "world_size"}, meta)  # compared above
