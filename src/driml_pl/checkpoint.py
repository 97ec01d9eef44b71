"""The run's checkpoint unit: Lightning's ``last.ckpt`` plus every rank's stream state and replay, written so that a
crash at any moment leaves the previous complete checkpoint resumable and untouched.

Layout under ``<run>/checkpoints/``::

    last.ckpt                                  Lightning's checkpoint; the commit point of the unit (renamed in last)
    units/<unit>/rank<r>/state.json            counters, rngs, episode statistics, the replay's segment list, CRCs
    units/<unit>/rank<r>/{generator,env_state}.npy
    replay/rank<r>/seg-<first>-<last>/*.npy    append-only segments of the replay's time slots

Writing a unit: every rank (1) finishes a launched env step, (2) appends the time slots added since its previous
checkpoint to the replay as a new segment, (3) writes its stream state, each into a temporary directory renamed
when complete; then (4) all ranks meet, rank 0 writes ``last.ckpt.tmp`` (naming the unit) and renames it over
``last.ckpt``: the commit. (5) Only then are older units and segments no longer referenced deleted. A crash before
(4) leaves the previous ``last.ckpt`` and everything it references in place; leftovers are removed by the next
commit. Nothing is pickled: JSON and ``.npy`` (read with ``allow_pickle=False``), CRC32 per file.

A segment ``seg-a-b`` holds the frames and episode-start flags of times ``a..b`` and the actions, rewards and done
flags of times ``a-1..b-1`` (those of the newest frame are only known after the next env step). Its cost follows the
transitions added since the previous checkpoint, not the replay's size. Resuming reads the segments straight into
the (preallocated) replay, with no second copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

from driml_pl.diskfull import DiskFullError, UnitGuard, unit_bytes
from driml_pl.interrupt import Interrupted, agree, announce

if TYPE_CHECKING:
    from driml_pl.data import ReplayStream
    from driml_pl.replay import FrameReplay

FORMAT = 1
CHUNK = 16 << 20  # bytes per read/write call (also the most a resume holds beyond the replay)
FRAME_COLUMNS = ("frames", "firsts")  # times a..b of a segment
STEP_COLUMNS = ("actions", "rewards", "dones")  # times a-1..b-1 of a segment


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file or the config key."""


@dataclass
class CheckpointConfig:
    """When the run's checkpoint unit is written (besides the end of the budget).

    Args:
        every_n_updates: every time the update count crosses a multiple of this (0: off).
        every_minutes: also every this many minutes of wall time (0: off).
        save_replay: write the replay (incrementally). Off: small checkpoints, and a resume refills the replay with
            ``data.learning_starts`` env steps of the restored policy first (approximate; a warning says so).
        on_signal: on SIGTERM (checkpoint, then stop with exit code 143) and SIGUSR1 (checkpoint, go on), e.g.
            pre-emption notices.
        on_exception: when the run dies of an exception outside a training step (an exception inside a step, or a
            non-finite loss, leaves the last good checkpoint as it is).
    """

    every_n_updates: int = 10_000
    every_minutes: float = 0.0
    save_replay: bool = True
    on_signal: bool = True
    on_exception: bool = True

    def __post_init__(self) -> None:
        if self.every_n_updates < 0:
            raise ValueError(f"checkpoint.every_n_updates={self.every_n_updates} is not allowed: must be >= 0")
        if self.every_minutes < 0:
            raise ValueError(f"checkpoint.every_minutes={self.every_minutes} is not allowed: must be >= 0")


# ----------------------------------------------------------------------------------------------- file helpers
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _npy_header(shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
    buffer = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(torch.empty(0, dtype=dtype).numpy().dtype)
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _write_npy(path: Path, array: np.ndarray | torch.Tensor) -> int:
    """Write one array as .npy from host or device memory in chunks (no full host copy); returns the file's CRC32."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.contiguous()
    header = _npy_header(tuple(tensor.shape), tensor.dtype)
    crc = zlib.crc32(header)
    flat = tensor.reshape(-1)
    step = max(1, CHUNK // max(1, tensor.element_size()))
    with path.open("wb") as f:
        f.write(header)
        for start in range(0, flat.numel(), step):
            data = memoryview(flat[start : start + step].cpu().numpy()).cast("B")  # type: ignore[arg-type]
            crc = zlib.crc32(data, crc)
            f.write(data)
            _inject_crash("mid_flush")
        f.flush()
        os.fsync(f.fileno())
    return crc


class _NpyReader:
    """Reads a .npy file sequentially into tensors (host or device), hashing every byte; `close` checks the size and
    the CRC. Nothing is read twice and nothing is held beyond one chunk (device) or nothing at all (host)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, crc: int | None) -> None:
        self.path, self.expected_crc = path, crc
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        self.file = path.open("rb")
        header = _npy_header(shape, dtype)
        found = self.file.read(len(header))
        if found != header:
            self.file.close()
            raise CheckpointError(f"checkpoint file {path} is corrupt or does not hold a {dtype} array of {shape}")
        self.crc = zlib.crc32(found)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        expected_size = len(header) + itemsize * int(np.prod(shape, dtype=np.int64))
        if os.fstat(self.file.fileno()).st_size != expected_size:
            self.file.close()
            raise CheckpointError(f"checkpoint file {path} is truncated or has trailing bytes")

    def _read(self, view: memoryview) -> None:
        if self.file.readinto(view) != len(view):
            raise CheckpointError(f"checkpoint file {self.path} is truncated")
        self.crc = zlib.crc32(view, self.crc)

    def skip(self, nbytes: int) -> None:
        while nbytes > 0:
            chunk = bytearray(min(nbytes, CHUNK))
            self._read(memoryview(chunk))
            nbytes -= len(chunk)

    def read_into(self, dest: torch.Tensor) -> None:
        flat = dest.view(-1)
        step = max(1, CHUNK // dest.element_size())
        for start in range(0, flat.numel(), step):
            part = flat[start : start + step]
            if dest.device.type == "cpu":
                self._read(memoryview(part.numpy()).cast("B"))  # type: ignore[arg-type]
            else:
                host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
                self._read(memoryview(host.numpy()).cast("B"))  # type: ignore[arg-type]
                part.copy_(host)

    def close(self) -> None:
        rest = self.file.read()
        self.crc = zlib.crc32(rest, self.crc)
        self.file.close()
        if rest or (self.expected_crc is not None and self.crc != self.expected_crc):
            raise CheckpointError(f"checkpoint file {self.path} is corrupt (CRC mismatch: truncated or altered)")


def _load_small_npy(path: Path, crc: int) -> np.ndarray:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    data = path.read_bytes()
    if zlib.crc32(data) != crc:
        raise CheckpointError(f"checkpoint file {path} is corrupt (CRC mismatch: truncated or altered)")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({err})") from None


# ------------------------------------------------------------------------------------------------- replay
def checkpoint_meta(game: str, num_envs: int, replay_size: int, frame_stack: int, world_size: int | None) -> dict:
    """Settings a resume must share with the checkpoint, under their config keys (named in errors); a None value
    (the world size before the trainer exists) is not compared."""
    return {
        "data.env.game": game,
        "data.env.num_envs": num_envs,
        "data.replay_size": replay_size,
        "data.frame_stack": frame_stack,
        "world_size": world_size,
    }


def _check_meta(saved: dict[str, Any], meta: dict[str, Any]) -> None:
    for key, value in saved.items():
        if meta.get(key) is not None and meta[key] != value:
            raise CheckpointError(
                f"{key}={meta[key]!r} does not fit the checkpoint, which was written with {key}={value!r}"
            )


def _read_state(path: Path) -> dict[str, Any]:
    """A rank's ``state.json``, checked against its ``state.crc``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing (the checkpoint unit is incomplete)")
    body = path.read_bytes()
    crc_path = path.with_name("state.crc")
    if not crc_path.is_file() or crc_path.read_text().strip() != str(zlib.crc32(body)):
        raise CheckpointError(f"checkpoint file {path} is corrupt (CRC mismatch: truncated or altered)")
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({err})") from None


def _column_times(column: str, first: int, last: int) -> tuple[int, int]:
    """The times of a column held by segment ``first..last``: frames and firsts ``first..last``, the step columns
    ``first-1..last-1`` (from 0)."""
    lo, hi = (first, last) if column in FRAME_COLUMNS else (first - 1, last - 1)
    return max(lo, 0), hi


def _segment_name(first: int, last: int) -> str:
    return f"seg-{first:012d}-{last:012d}"


def write_segment(replay: FrameReplay, root: Path, first: int, last: int) -> dict[str, Any]:
    """Append times ``first..last`` of ``replay`` as a new segment under ``root``; returns its manifest entry.
    Times the ring no longer holds (older than ``last - capacity + 1``) are left out."""
    first = max(first, last - replay.capacity + 1, 0)
    name = _segment_name(first, last)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    crcs: dict[str, int] = {}
    cap = replay.capacity
    for column in FRAME_COLUMNS + STEP_COLUMNS:
        lo, hi = _column_times(column, first, last)
        data = getattr(replay, column)
        if hi < lo:
            part = data[:0]
        elif lo // cap == hi // cap or lo % cap <= hi % cap:
            part = data[lo % cap : hi % cap + 1]
        else:  # wraps around the ring
            part = torch.cat([data[lo % cap :], data[: hi % cap + 1]])
        crcs[column] = _write_npy(tmp / f"{column}.npy", part)
    _fsync_dir(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    return {"name": name, "first": first, "last": last, "crc": crcs}


def read_segments(replay: FrameReplay, root: Path, segments: list[dict[str, Any]], t: int) -> None:
    """Fill ``replay`` (already sized) with the times ``t - capacity + 1 .. t`` from the listed segments, reading
    each file straight into the ring's slots."""
    cap = replay.capacity
    oldest = max(0, t - cap + 1)
    for seg in segments:
        for column in FRAME_COLUMNS + STEP_COLUMNS:
            lo, hi = _column_times(column, seg["first"], seg["last"])
            data: torch.Tensor = getattr(replay, column)
            count = max(0, hi - lo + 1)
            row_bytes = data[0].numel() * data.element_size()
            reader = _NpyReader(root / seg["name"] / f"{column}.npy", (count, *data.shape[1:]), data.dtype,
                                seg["crc"][column])  # fmt: skip
            try:
                time_index = lo
                if time_index < oldest:
                    reader.skip((min(oldest, hi + 1) - time_index) * row_bytes)
                    time_index = oldest
                while time_index <= hi:  # at most two contiguous runs in the ring
                    slot = time_index % cap
                    run = min(hi - time_index + 1, cap - slot)
                    reader.read_into(data[slot : slot + run])
                    time_index += run
            finally:
                reader.close()


# -------------------------------------------------------------------------------------- the stream's state
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


class StreamCheckpointer:
    """Writes and reads one rank's stream state and replay segments (the per-rank half of the unit)."""

    def __init__(self, directory: Path, rank: int, save_replay: bool) -> None:
        self.directory, self.rank, self.save_replay = directory, rank, save_replay
        self.segments: list[dict[str, Any]] = []  # the replay's segments as of the last written unit
        self.flushed_t = -1  # newest time written to segments

    @property
    def replay_root(self) -> Path:
        return self.directory / "replay" / f"rank{self.rank}"

    def unit_dir(self, unit: str) -> Path:
        return self.directory / "units" / unit / f"rank{self.rank}"

    def write(self, stream: ReplayStream, unit: str, step: int, meta: dict[str, Any]) -> None:
        stream.settle()
        replay = stream.collector.replay
        if self.save_replay:
            self.replay_root.mkdir(parents=True, exist_ok=True)
            t = replay.t
            first = max(self.flushed_t + 1, t - replay.capacity + 1, 0)
            if t >= first:
                self.segments.append(write_segment(replay, self.replay_root, first, t))
            # segment k holds the step columns of times first_k - 1 .. last_k - 1: exactly those that became final
            # since checkpoint k - 1, so nothing written is ever rewritten
            self.flushed_t = t
            oldest = t - replay.capacity + 1
            self.segments = [s for s in self.segments if s["last"] >= oldest]
        state = stream.state_dict()
        target = self.unit_dir(unit)
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        generator = np.asarray(state.pop("generator"), dtype=np.uint8)
        env_states: list[bytes] = state["collector"].pop("env_state")
        lengths = np.array([len(b) for b in env_states], dtype=np.int64)
        blob = np.frombuffer(bytearray(b"".join(env_states)), dtype=np.uint8)
        crc = {
            "generator.npy": _write_npy(tmp / "generator.npy", generator),
            "env_state.npy": _write_npy(tmp / "env_state.npy", blob),
            "env_state_lengths.npy": _write_npy(tmp / "env_state_lengths.npy", lengths),
        }
        document = {
            "format": FORMAT,
            "global_step": step,
            "rank": self.rank,
            "meta": meta,
            "replay": {
                "saved": self.save_replay,
                "t": replay.t,
                "capacity": replay.capacity,
                "num_envs": replay.num_envs,
                "segments": self.segments,
            },
            "stream": state,
            "crc": crc,
        }
        body = json.dumps(document, default=_json_default, indent=1).encode()
        (tmp / "state.json").write_bytes(body)
        (tmp / "state.crc").write_text(str(zlib.crc32(body)))
        for name in ("state.json", "state.crc"):
            with (tmp / name).open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def read(self, stream: ReplayStream, unit: str, step: int, meta: dict[str, Any]) -> None:
        directory = self.unit_dir(unit)
        path = directory / "state.json"
        document = _read_state(path)
        if document.get("format") != FORMAT or document.get("global_step") != step:
            raise CheckpointError(f"checkpoint file {path} does not belong to the checkpoint of update {step}")
        _check_meta(document["meta"], meta)
        replay_doc = document["replay"]
        replay = stream.collector.replay
        crc = document["crc"]
        generator = _load_small_npy(directory / "generator.npy", crc["generator.npy"])
        blob = _load_small_npy(directory / "env_state.npy", crc["env_state.npy"]).tobytes()
        lengths = _load_small_npy(directory / "env_state_lengths.npy", crc["env_state_lengths.npy"])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        env_states = [blob[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
        state = document["stream"]
        state["generator"] = torch.from_numpy(generator)
        state["collector"]["env_state"] = env_states
        if replay_doc["saved"]:
            read_segments(replay, self.replay_root, replay_doc["segments"], replay_doc["t"])
            replay.t = int(replay_doc["t"])
            stream.load_state_dict(state, replay_restored=True)
        else:
            if self.rank == 0:  # printed, not a warnings.warn: a user must see it even with warnings filtered
                print(
                    "driml_pl: warning: resuming without a saved replay (checkpoint.save_replay=false): the replay is "
                    "refilled with data.learning_starts env steps of the restored policy before updates go on; the run "
                    "is not an exact continuation",
                    file=sys.stderr,
                )
            stream.load_state_dict(state, replay_restored=False)
        self.segments = list(replay_doc["segments"]) if replay_doc["saved"] else []
        self.flushed_t = int(replay_doc["t"]) if replay_doc["saved"] else -1

    def prune(self, keep_unit: str) -> None:
        """Delete this rank's units other than ``keep_unit`` and the segments its replay no longer references."""
        units = self.directory / "units"
        if units.is_dir():
            for unit in units.iterdir():
                if unit.name == keep_unit:
                    continue
                shutil.rmtree(unit / f"rank{self.rank}", ignore_errors=True)
                # every rank prunes at once: the unit goes with whichever rank empties it last. rmdir is atomic; it
                # fails while another rank's half is still there, or once that rank removed the unit itself (an
                # "is it empty?" listing could find the directory gone in between: the 2-rank test's rare failure)
                with contextlib.suppress(OSError):
                    unit.rmdir()
        keep = {s["name"] for s in self.segments}
        if self.replay_root.is_dir():
            for seg in self.replay_root.iterdir():
                if seg.name not in keep:
                    shutil.rmtree(seg, ignore_errors=True)


_COLUMN_LAYOUT: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "frames": ((64, 64, 3), torch.uint8),
    "firsts": ((), torch.bool),
    "actions": ((), torch.uint8),
    "rewards": ((), torch.float32),
    "dones": ((), torch.bool),
}


def _check_segment_sizes(root: Path, replay: dict[str, Any]) -> None:
    """Every segment file a unit references exists with the size its shape implies (cheap: no reading)."""
    if not replay.get("saved"):
        return
    for seg in replay["segments"]:
        for column, (tail, dtype) in _COLUMN_LAYOUT.items():
            lo, hi = _column_times(column, seg["first"], seg["last"])
            count = max(0, hi - lo + 1)
            shape = (count, int(replay["num_envs"]), *tail)
            expected = len(_npy_header(shape, dtype)) + torch.empty(0, dtype=dtype).element_size() * int(np.prod(shape))
            path = root / seg["name"] / f"{column}.npy"
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing")
            if path.stat().st_size != expected:
                raise CheckpointError(f"checkpoint file {path} is truncated or has trailing bytes")


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
    state = checkpoint.get("DRIMLDataModule") or {}
    unit, world = state.get("unit"), state.get("world_size")
    if not unit:
        raise CheckpointError(f"checkpoint file {ckpt_path} has no stream state (written by an older driml_pl)")
    if meta.get("world_size") is not None and world != meta["world_size"]:
        raise CheckpointError(
            f"trainer.devices x num_nodes={meta.get('world_size')} does not fit the checkpoint {ckpt_path}, written "
            f"with {world} ranks"
        )
    for rank in range(int(world or 0)):
        document = _read_state(ckpt_path.parent / "units" / unit / f"rank{rank}" / "state.json")
        _check_segment_sizes(ckpt_path.parent / "replay" / f"rank{rank}", document["replay"])
        _check_meta({k: v for k, v in document["meta"].items() if k != "world_size"}, meta)  # compared above


# ------------------------------------------------------------------------------------------------ callback
class RunCheckpoint(ModelCheckpoint):
    """Writes the checkpoint unit on the configured cadence, on signals, on exceptions and at the end of the budget.

    It is a `ModelCheckpoint` so that Lightning's ``--ckpt_path last`` finds ``<dirpath>/last.ckpt``; Lightning's own
    saving logic is not used.
    """

    def __init__(self, dirpath: str | Path, config: CheckpointConfig | None = None) -> None:
        super().__init__(dirpath=dirpath, save_last=False, save_top_k=0, every_n_epochs=0)
        self.config = config or CheckpointConfig()
        self._last_time = time.monotonic()
        self._last_updates = 0
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._in_step = False
        self._sequence = 0
        self._pending_unit: str | None = None  # written, not yet committed
        self.terminated = False  # set after a SIGTERM checkpoint: the CLI exits with 143
        # issue 19 hooks (driml_pl.interrupt, driml_pl.diskfull): Ctrl-C's checkpoint (exit 130), the unit's guard
        self.interrupted = False  # set after the first Ctrl-C's checkpoint is due: the CLI exits with 130
        self.committed: str | None = None  # the last committed unit: "<dir>/last.ckpt (update N)", for messages
        self._guard: UnitGuard | None = None  # the written, not yet committed unit's guard
        self._slow = float(os.environ.get("DRIML_SLOW_UPDATES", "0"))  # test hook: seconds of sleep per step

    # signals -------------------------------------------------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and (self.interrupted or self._signal == signal.SIGINT):
            raise Interrupted(self.committed)  # issue 19 hook: a second Ctrl-C stops at once (unit discarded)
        self._signal = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time = time.monotonic()
        self._last_updates = trainer.global_step
        if trainer.ckpt_path and trainer.global_step > 0:  # resumed: that unit is the last good one
            self.committed = f"{trainer.ckpt_path} (update {trainer.global_step})"
        if self.config.on_signal:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # issue 19: SIGINT (Ctrl-C) as well
                with contextlib.suppress(ValueError):  # not the main thread: no handlers
                    self._previous_handlers[sig] = signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    # cadence -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.commit_unit(trainer)  # the unit written at the end of the previous step, now that its logs are out
        self._in_step = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._in_step = False
        if self._slow:
            time.sleep(self._slow)
        cfg, updates = self.config, trainer.global_step
        due = cfg.every_n_updates > 0 and updates // cfg.every_n_updates > self._last_updates // cfg.every_n_updates
        due |= cfg.every_minutes > 0 and time.monotonic() - self._last_time >= 60 * cfg.every_minutes
        sig, self._signal = agree(trainer, self._signal), None  # issue 19 hook: one signal for all ranks
        if sig == signal.SIGTERM:
            self.terminated = True
            trainer.should_stop = True
        if sig == signal.SIGINT:  # issue 19 hook: Ctrl-C is SIGTERM's checkpoint, then exit 130
            self.interrupted = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                announce(updates, self.committed)
        if sig is not None or (due and not trainer.should_stop):  # at the budget's end, on_train_end writes it
            self.write_unit(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.commit_unit(trainer)
        if trainer.global_step > 0 and self._last_updates != trainer.global_step:
            self.write_unit(trainer)  # the end of the budget (or of max_steps)
            self.commit_unit(trainer)
        self._restore_handlers()  # issue 19: after the last unit, so that a Ctrl-C while it is written is handled

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, Interrupted | DiskFullError):  # issue 19 hook: stop now, write nothing more
            if self._guard is not None:
                self._guard.discard()  # a written, uncommitted unit goes too: last.ckpt stays the previous one
            self._guard = self._pending_unit = None
            return
        try:
            self.commit_unit(trainer)  # a unit written before the failure is complete
            if not self.config.on_exception or self._in_step or trainer.global_step == self._last_updates:
                return  # inside a step the state is half-updated: the last good checkpoint stays
            if getattr(pl_module, "nonfinite_update", lambda: None)() is not None:
                return
            self.write_unit(trainer)
            self.commit_unit(trainer)
        except Exception as err:  # the original exception matters more
            rank_zero_warn(f"could not write a checkpoint after the exception: {err}")

    # the unit ------------------------------------------------------------------------------------------
    def _directory(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")

    def write_unit(self, trainer: pl.Trainer) -> None:
        """Write every rank's half and ``last.ckpt.tmp`` for the state after this step (called on every rank).
        The commit follows at the start of the next step (or at the end of the run), once this step's metrics
        have reached the loggers, so that a resumed run's logs have no gap."""
        check = getattr(trainer.lightning_module, "check_finite", None)
        if check is not None:
            check(all_ranks=True)  # NaN weights are never checkpointed: nothing of the unit is written then
        datamodule = getattr(trainer, "datamodule", None)
        directory = self._directory(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        global _UNITS
        _UNITS += 1
        self._sequence += 1
        unit = f"u{trainer.global_step:012d}-{self._sequence:04d}-{int(time.time())}"
        writer = getattr(datamodule, "write_checkpoint_half", None)
        guard = UnitGuard(directory, unit, trainer.global_rank, self.committed, unit_bytes(trainer))
        with guard:  # issue 19 hook (driml_pl.diskfull): a failed write leaves no partial files; ENOSPC: one line
            if writer is not None:
                writer(directory, unit)
            trainer.strategy.barrier("driml_pl.checkpoint.halves")
            trainer.save_checkpoint(directory / "last.ckpt.tmp", weights_only=False)  # every rank dumps; rank 0 writes
        self._pending_unit, self._guard = unit, guard
        self._last_time = time.monotonic()
        self._last_updates = trainer.global_step

    def commit_unit(self, trainer: pl.Trainer) -> None:
        """Make the written unit the one ``--ckpt_path last`` resumes (rank 0 renames), then prune older ones."""
        unit, self._pending_unit = self._pending_unit, None
        if unit is None:
            return
        directory = self._directory(trainer)
        guard, self._guard = self._guard, None
        with guard or contextlib.nullcontext():  # issue 19 hook: a full disk here discards the unit (not committed)
            for logger in trainer.loggers:
                logger.save()  # every metric logged up to this step is on disk before the commit
            if trainer.is_global_zero:
                _inject_crash("before_commit")
                tmp = directory / "last.ckpt.tmp"
                with tmp.open("rb") as f:
                    os.fsync(f.fileno())
        if trainer.is_global_zero:
            os.replace(tmp, directory / "last.ckpt")
            _fsync_dir(directory)
        trainer.strategy.barrier("driml_pl.checkpoint.commit")
        _inject_crash("after_commit")
        pruner = getattr(getattr(trainer, "datamodule", None), "prune_checkpoint_halves", None)
        if pruner is not None:
            pruner(unit)
        self.last_model_path = str(directory / "last.ckpt")
        self.committed = f"{self.last_model_path} (update {int(unit[1:13])})"  # issue 19: for the one-line messages


_UNITS = 0  # checkpoint units started by this process (for the test hook)


def _inject_crash(moment: str) -> None:
    """Test hook: ``DRIML_CRASH_AT=<moment>`` SIGKILLs the process at that point (``mid_flush``, ``before_commit``,
    ``after_commit``) of its ``DRIML_CRASH_AFTER``-th (default first) checkpoint unit; ``DRIML_CRASH_SIGNAL=SIGINT``
    sends that signal instead (issue 19: a Ctrl-C in the middle of a unit)."""
    if os.environ.get("DRIML_CRASH_AT") == moment and int(os.environ.get("DRIML_CRASH_AFTER", "1")) == _UNITS:
        os.kill(os.getpid(), getattr(signal, os.environ.get("DRIML_CRASH_SIGNAL", "SIGKILL")))
