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
from driml_pl.checkpoint.format import CheckpointDamaged, CheckpointError

UNIT_KEY = "driml_unit"  # the unit pointer in last.ckpt
LAST, PREVIOUS = "last.ckpt", "previous.ckpt"  # the newest unit's commit point, and the one before it
LEGACY_UNIT_KEY = "DRIMLDataModule"  # where checkpoints written before the checkpoint package kept it


def checkpoint_dir(root: str | Path) -> Path:
    """The run directory's checkpoint folder."""
    return Path(root) / "checkpoints"


def last_checkpoint_in(directory: str | Path) -> Path:
    """The commit point of the checkpoint unit in a checkpoint folder."""
    return Path(directory) / LAST


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


def previous_checkpoint_in(directory: str | Path) -> Path:
    """The commit point of the unit before the newest (kept for a fallback, `choose_resumable`)."""
    return Path(directory) / PREVIOUS


def _load(ckpt_path: Path) -> dict[str, Any]:
    """``ckpt_path`` loaded without unpickling code. A planted pickle is refused (`CheckpointError`), never
    skipped; a file that does not load is damaged (`CheckpointDamaged`)."""
    if not ckpt_path.is_file():
        raise CheckpointDamaged(f"checkpoint file {ckpt_path} is missing")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to load is reported the same way
        if "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint file {ckpt_path} cannot be loaded: it holds pickled objects, which are not loaded"
            ) from None
        raise CheckpointDamaged(f"checkpoint file {ckpt_path} cannot be loaded: truncated or corrupt") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint file {ckpt_path} is not a driml_pl checkpoint")
    return checkpoint


def check_resumable(
    ckpt_path: Path, meta: dict[str, Any], read_segments_except: set[str] | None = None
) -> dict[str, Any]:
    """Before anything is written: ``ckpt_path`` loads without unpickling code, names a complete unit, and that unit
    was written with the same settings (``meta``: config key -> value). Raises `CheckpointError` naming the file or
    the key (`CheckpointDamaged` for a missing, truncated or altered file). Returns the unit pointer.

    Always checked: the Lightning file's recorded size and CRC32 (units written since that checksum existed), every
    rank's ``state.json`` and small arrays against their CRCs, every replay segment's size. With
    ``read_segments_except``, every segment the unit references but those named there is also read and its CRC
    checked (the resume checks every segment while reading it in anyway): a fallback decision reads the segments
    the newest unit does not share with the one before it.
    """
    checkpoint = _load(ckpt_path)
    state = unit_pointer(checkpoint)
    unit, world = state.get("unit"), state.get("world_size")
    if not unit:
        raise CheckpointError(f"checkpoint file {ckpt_path} has no stream state (written by an older driml_pl)")
    if meta.get("world_size") is not None and world != meta["world_size"]:
        raise CheckpointError(
            f"trainer.devices x num_nodes={meta.get('world_size')} does not fit the checkpoint {ckpt_path}, written "
            f"with {world} ranks"
        )
    units = ckpt_path.parent / "units" / unit
    for rank in range(int(world or 0)):
        document = format.read_state(units / f"rank{rank}" / "state.json")
        format.check_unit_files(units / f"rank{rank}", document)
        format.check_segment_sizes(ckpt_path.parent / "replay" / f"rank{rank}", document["replay"])
        format.check_meta({k: v for k, v in document["meta"].items() if k != "world_size"}, meta)  # compared above
        if read_segments_except is not None:
            format.check_segment_crcs(ckpt_path.parent / "replay" / f"rank{rank}", document["replay"],
                                      read_segments_except)  # fmt: skip
    if state.get("checksum"):
        format.check_commit_crc(ckpt_path, units / "rank0")
    return state


def choose_resumable(ckpt_path: Path, meta: dict[str, Any]) -> tuple[Path, str | None]:
    """The checkpoint a resume of ``ckpt_path`` should read, and a one-line note when it is not ``ckpt_path``.

    A run's ``last.ckpt`` whose unit is damaged (any file missing, truncated or failing its CRC) falls back to
    ``previous.ckpt``, the unit before it, if that one is intact: the replay rolls back with it (its segments are
    kept until a newer unit is committed). Settings that do not fit and planted pickles are refused, never skipped;
    if neither unit is intact, the newest one's refusal is raised.
    """
    previous = previous_checkpoint_in(ckpt_path.parent)
    can_fall_back = ckpt_path.name == LAST and previous.is_file()
    try:
        check_resumable(ckpt_path, meta, _segments_of(previous) if can_fall_back else None)
        return ckpt_path, None
    except CheckpointDamaged as damaged:
        if not can_fall_back:
            raise
        try:
            state = check_resumable(previous, meta)
        except CheckpointError:
            raise damaged from None
        note = (
            f"driml_pl: warning: skipped the newest checkpoint unit ({damaged}); resuming from the one before it, "
            f"{previous} (update {int(state.get('global_step', 0)):,}), its replay rolled back with it"
        )
        return previous, note


def _segments_of(ckpt_path: Path) -> set[str]:
    """The replay segments (of any rank) the unit of ``ckpt_path`` references; empty if it cannot be read."""
    try:
        state = unit_pointer(_load(ckpt_path))
        units = ckpt_path.parent / "units" / str(state.get("unit"))
        names: set[str] = set()
        for rank in range(int(state.get("world_size") or 0)):
            replay = format.read_state(units / f"rank{rank}" / "state.json")["replay"]
            names.update(seg["name"] for seg in replay["segments"])
        return names
    except (CheckpointError, KeyError, TypeError):
        return set()
