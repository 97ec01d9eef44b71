"""The checkpoint unit on disk: Lightning's ``last.ckpt`` plus every rank's stream state and replay, written so that
a crash at any moment leaves the previous complete checkpoint resumable and untouched. This file is the format (what
is written where, CRC'd ``.npy``/JSON primitives, one rank's half); `driml_pl.checkpoint.callback` decides when.

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
import sys
import zlib
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from driml_pl.data.replay import FrameReplay
    from driml_pl.data.stream import ReplayStream

FORMAT = 1
CHUNK = 16 << 20  # bytes per read/write call (also the most a resume holds beyond the replay)
FRAME_COLUMNS = ("frames", "firsts")  # times a..b of a segment
STEP_COLUMNS = ("actions", "rewards", "dones")  # times a-1..b-1 of a segment


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file or the config key."""


class CheckpointDamaged(CheckpointError):
    """A file of a checkpoint unit is missing, truncated or fails its CRC: the unit is damaged (not misfit), and a
    resume may fall back to the unit before it (`driml_pl.checkpoint.resume.choose_resumable`)."""


# ----------------------------------------------------------------------------------------------- file helpers
def fsync_dir(path: Path) -> None:
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


def write_npy(path: Path, array: np.ndarray | torch.Tensor) -> int:
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
        f.flush()
        os.fsync(f.fileno())
    return crc


def file_crc(path: Path) -> int:
    """The CRC32 of a whole file, read in chunks."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class _NpyReader:
    """Reads a .npy file sequentially into tensors (host or device), hashing every byte; `close` checks the size and
    the CRC. Nothing is read twice and nothing is held beyond one chunk (device) or nothing at all (host)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, crc: int | None) -> None:
        self.path, self.expected_crc = path, crc
        if not path.is_file():
            raise CheckpointDamaged(f"checkpoint file {path} is missing")
        self.file = path.open("rb")
        header = _npy_header(shape, dtype)
        found = self.file.read(len(header))
        if found != header:
            self.file.close()
            raise CheckpointDamaged(f"checkpoint file {path} is corrupt or does not hold a {dtype} array of {shape}")
        self.crc = zlib.crc32(found)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        expected_size = len(header) + itemsize * int(np.prod(shape, dtype=np.int64))
        if os.fstat(self.file.fileno()).st_size != expected_size:
            self.file.close()
            raise CheckpointDamaged(f"checkpoint file {path} is truncated or has trailing bytes")

    def _read(self, view: memoryview) -> None:
        if self.file.readinto(view) != len(view):
            raise CheckpointDamaged(f"checkpoint file {self.path} is truncated")
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
            raise CheckpointDamaged(f"checkpoint file {self.path} is corrupt (CRC mismatch: truncated or altered)")


def _load_small_npy(path: Path, crc: int) -> np.ndarray:
    if not path.is_file():
        raise CheckpointDamaged(f"checkpoint file {path} is missing")
    data = path.read_bytes()
    if zlib.crc32(data) != crc:
        raise CheckpointDamaged(f"checkpoint file {path} is corrupt (CRC mismatch: truncated or altered)")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise CheckpointDamaged(f"checkpoint file {path} is corrupt ({err})") from None


# ------------------------------------------------------------------------------------------------- replay
def check_meta(saved: dict[str, Any], meta: dict[str, Any]) -> None:
    for key, value in saved.items():
        if meta.get(key) is not None and meta[key] != value:
            raise CheckpointError(
                f"{key}={meta[key]!r} does not fit the checkpoint, which was written with {key}={value!r}"
            )


def read_state(path: Path) -> dict[str, Any]:
    """A rank's ``state.json``, checked against its ``state.crc``."""
    if not path.is_file():
        raise CheckpointDamaged(f"checkpoint file {path} is missing (the checkpoint unit is incomplete)")
    body = path.read_bytes()
    crc_path = path.with_name("state.crc")
    if not crc_path.is_file() or crc_path.read_text().strip() != str(zlib.crc32(body)):
        raise CheckpointDamaged(f"checkpoint file {path} is corrupt (CRC mismatch: truncated or altered)")
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise CheckpointDamaged(f"checkpoint file {path} is corrupt ({err})") from None


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
        crcs[column] = write_npy(tmp / f"{column}.npy", part)
    fsync_dir(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
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
        self.unit_segments: dict[str, list[str]] = {}  # unit -> the segments it references (for `prune`)

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
            "generator.npy": write_npy(tmp / "generator.npy", generator),
            "env_state.npy": write_npy(tmp / "env_state.npy", blob),
            "env_state_lengths.npy": write_npy(tmp / "env_state_lengths.npy", lengths),
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
        fsync_dir(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        self.unit_segments[unit] = [s["name"] for s in self.segments]

    def read(self, stream: ReplayStream, unit: str, step: int, meta: dict[str, Any]) -> None:
        directory = self.unit_dir(unit)
        path = directory / "state.json"
        document = read_state(path)
        if document.get("format") != FORMAT or document.get("global_step") != step:
            raise CheckpointDamaged(f"checkpoint file {path} does not belong to the checkpoint of update {step}")
        check_meta(document["meta"], meta)
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
        self.unit_segments = {unit: [s["name"] for s in self.segments]}

    def segments_of(self, unit: str) -> list[str]:
        """The segments ``unit`` references: known if this process wrote or read it, else from its state.json (a
        damaged one references nothing worth keeping)."""
        if unit not in self.unit_segments:
            try:
                replay = read_state(self.unit_dir(unit) / "state.json")["replay"]
                self.unit_segments[unit] = [s["name"] for s in replay["segments"]] if replay["saved"] else []
            except (CheckpointError, KeyError, TypeError):
                self.unit_segments[unit] = []
        return self.unit_segments[unit]

    def prune(self, keep_units: Collection[str]) -> None:
        """Delete this rank's units other than ``keep_units`` and the segments none of them references."""
        keep_units = set(keep_units)
        units = self.directory / "units"
        if units.is_dir():
            for unit in units.iterdir():
                if unit.name in keep_units:
                    continue
                shutil.rmtree(unit / f"rank{self.rank}", ignore_errors=True)
                # every rank prunes at once: the unit goes with whichever rank empties it last. rmdir is atomic; it
                # fails while another rank's half is still there, or once that rank removed the unit itself (an
                # "is it empty?" listing could find the directory gone in between: the 2-rank test's rare failure)
                with contextlib.suppress(OSError):
                    unit.rmdir()
        keep = {name for unit in keep_units for name in self.segments_of(unit)}
        self.unit_segments = {u: names for u, names in self.unit_segments.items() if u in keep_units}
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


def check_segment_sizes(root: Path, replay: dict[str, Any]) -> None:
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
                raise CheckpointDamaged(f"checkpoint file {path} is missing")
            if path.stat().st_size != expected:
                raise CheckpointDamaged(f"checkpoint file {path} is truncated or has trailing bytes")


def check_unit_files(unit_dir: Path, document: dict[str, Any]) -> None:
    """A rank's small arrays (generator, emulator states) have the CRCs its ``state.json`` recorded."""
    for name, crc in document.get("crc", {}).items():
        _load_small_npy(unit_dir / name, crc)  # the same check the resume makes when it reads them


def check_segment_crcs(root: Path, replay: dict[str, Any], skip: Collection[str]) -> None:
    """Every segment file a unit references, but those of the segments named in ``skip``, has its recorded CRC."""
    if not replay.get("saved"):
        return
    for seg in replay["segments"]:
        if seg["name"] in skip:
            continue
        for column, crc in seg["crc"].items():
            path = root / seg["name"] / f"{column}.npy"
            if file_crc(path) != crc:
                raise CheckpointDamaged(f"checkpoint file {path} is corrupt (CRC mismatch: truncated or altered)")


def flush_file(path: Path) -> None:
    """``path``'s bytes on the disk (before the commit renames it)."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


COMMIT_CRC = "ckpt.crc"  # in units/<unit>/rank0/: the size and CRC32 of the unit's Lightning checkpoint


def write_commit_crc(ckpt: Path, unit_dir: Path) -> None:
    """Record the size and CRC32 of ``ckpt`` (complete, flushed, not yet renamed) in its unit, for the resume's
    verification (`check_commit_crc`)."""
    path = unit_dir / COMMIT_CRC
    path.write_text(json.dumps({"size": ckpt.stat().st_size, "crc": file_crc(ckpt)}))
    flush_file(path)


def check_commit_crc(ckpt: Path, unit_dir: Path) -> None:
    """``ckpt`` has the size and CRC32 its unit recorded at the commit; raises `CheckpointDamaged` if not."""
    path = unit_dir / COMMIT_CRC
    if not path.is_file():
        raise CheckpointDamaged(f"checkpoint file {path} is missing (the checksum of {ckpt.name})")
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointDamaged(f"checkpoint file {path} is corrupt") from None
    if ckpt.stat().st_size != recorded.get("size") or file_crc(ckpt) != recorded.get("crc"):
        raise CheckpointDamaged(f"checkpoint file {ckpt} is corrupt (CRC mismatch: truncated or altered)")


def keep_as_previous(last: Path, previous: Path) -> None:
    """Make ``previous`` the committed ``last`` (a hard link: no copy) before a new commit replaces ``last``. A crash
    in between leaves both naming the same unit."""
    tmp = previous.with_name(previous.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(last, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(last, tmp)
        flush_file(tmp)
    os.replace(tmp, previous)
    fsync_dir(previous.parent)


def commit_file(tmp: Path, final: Path) -> None:
    """The commit of a unit: ``tmp`` (complete, flushed) atomically replaces ``final``; the rename is made durable."""
    os.replace(tmp, final)
    fsync_dir(final.parent)
