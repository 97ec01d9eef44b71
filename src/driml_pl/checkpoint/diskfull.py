"""A checkpoint unit that could not be written: its partial files removed, the previous unit left as it was.

`RunCheckpoint` writes each unit inside `UnitGuard`: whatever stops the write (a full disk, a second Ctrl-C, any other
exception) removes what this rank wrote of the new unit — its temporary directories, its half of the unit, the replay
segments it added and, on rank 0, ``last.ckpt.tmp`` — so the checkpoint directory holds exactly the last committed
unit again. A full disk (ENOSPC, also under another exception) becomes `DiskFullError`: one line naming the directory,
what the unit needed and what was free, and the last good checkpoint; the CLI exits with `EXIT_CODE` (28).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

EXIT_CODE = 28  # errno ENOSPC on Linux; clashes with no other exit code of the CLI (1, 2, 3, 130, 143)
_MB = 1 << 20


class DiskFullError(RuntimeError):
    """No space left on the checkpoint's filesystem; the message is the one line the CLI prints."""


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC (or EDQUOT, a full quota) anywhere in the exception's chain of causes."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):  # a library that re-raises it as another type
            return True
        err = err.__cause__ or err.__context__
    return False


def _tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def unit_bytes(trainer: Any) -> int:
    """About what one rank's unit writes: the replay segment of the time slots added since the last unit, the weights
    and optimizer state of ``last.ckpt``, and the stream's small state (counted as the envs' emulator states)."""
    total = 0
    module = getattr(trainer, "lightning_module", None)
    if module is not None:
        total += _tensor_bytes(module.state_dict())
    for optimizer in getattr(trainer, "optimizers", []) or []:
        total += _tensor_bytes(optimizer.state_dict().get("state", {}))
    datamodule = getattr(trainer, "datamodule", None)
    stream = getattr(datamodule, "stream", None)
    writer = getattr(datamodule, "_stream_checkpointer", None)
    if stream is not None:
        replay = stream.collector.replay
        flushed = getattr(writer, "flushed_t", -1)
        saved = getattr(writer, "save_replay", True)
        times = max(0, replay.t - max(flushed + 1, replay.t - replay.capacity + 1, 0) + 1) if saved else 0
        per_time = sum(
            getattr(replay, c)[0].numel() * getattr(replay, c).element_size()
            for c in ("frames", "firsts", "actions", "rewards", "dones")
        )
        total += times * per_time + 64 * 1024 * replay.num_envs  # emulator states: tens of KB per env
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class UnitGuard:
    """Around the writing of one unit by one rank (a context manager), and kept until its commit.

    Args:
        directory: the checkpoint directory (``<run>/checkpoints``).
        unit: the name of the unit being written.
        rank: this process's global rank (its half: ``units/<unit>/rank<r>``, ``replay/rank<r>``).
        describe_last: the last good checkpoint, for the message (``<path> (update N)``), or None.
        needed: about what the unit writes, in bytes (`unit_bytes`, taken before the write), for the message.
    """

    def __init__(self, directory: Path, unit: str, rank: int, describe_last: str | None, needed: int) -> None:
        self.directory, self.unit, self.rank, self.describe_last = directory, unit, rank, describe_last
        self.replay_root = directory / "replay" / f"rank{rank}"
        self.before = set(os.listdir(self.replay_root)) if self.replay_root.is_dir() else set()
        self.needed = needed

    def discard(self) -> None:
        """Remove everything of this rank's part of the unit (the previous unit is never touched)."""
        half = self.directory / "units" / self.unit
        if half.is_dir():
            for entry in half.iterdir():
                if entry.name == f"rank{self.rank}" or entry.name.startswith(f".tmp-rank{self.rank}-"):
                    _remove(entry)
            with contextlib.suppress(OSError):
                half.rmdir()  # the last rank's half removes the unit's directory
        if self.replay_root.is_dir():
            for name in set(os.listdir(self.replay_root)) - self.before:
                _remove(self.replay_root / name)  # the segment added for this unit (complete or not)
        if self.rank == 0:
            _remove(self.directory / "last.ckpt.tmp")
            _remove(self.directory / "previous.ckpt.tmp")  # `format.keep_as_previous`'s, if cut short

    def __enter__(self) -> UnitGuard:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if err is None:
            return
        self.discard()
        if is_disk_full(err):
            raise self.error(err) from None

    def _elsewhere(self, err: BaseException | None, free: int) -> str:
        """A full filesystem other than the checkpoint's (Lightning stages ``last.ckpt`` in the temporary directory
        first): named when the failed file lies there and that filesystem has less room than the directory's."""
        for name in (getattr(err, "filename", None), getattr(err, "filename2", None)):
            if not name or str(name).startswith(str(self.directory)):
                continue
            folder = Path(str(name)).parent
            with contextlib.suppress(OSError):
                if os.stat(folder).st_dev != os.stat(self.directory).st_dev:
                    other = shutil.disk_usage(folder).free
                    if other < min(free, self.needed):
                        return f" (staged through {name}, on a filesystem with {other / _MB:,.1f} MB free)"
        return ""

    def error(self, err: BaseException | None = None) -> DiskFullError:
        """The one-line `DiskFullError` (after `discard`: what is free now is what the unit could have used)."""
        free = shutil.disk_usage(self.directory).free if self.directory.exists() else 0
        step = int(self.unit[1:13]) if self.unit[1:13].isdigit() else -1
        where = f"{self.directory}" + self._elsewhere(err, free)
        last = (
            f"the last good checkpoint is {self.describe_last}, left as it was"
            if self.describe_last
            else "no checkpoint of this run was written"
        )
        return DiskFullError(
            f"no space left on device writing the checkpoint of update {step:,} to {where}: it needed about "
            f"{self.needed / _MB:,.1f} MB, {free / _MB:,.1f} MB were free; its partial files were removed and {last}; "
            "free space, then resume with --ckpt_path last"
        )
