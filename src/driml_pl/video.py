"""Evaluation videos: MP4 (H.264) files through imageio-ffmpeg, animated GIFs for TensorBoard (and as the fallback).

Files on disk (``<run>/videos/``) and in W&B are MP4: H.264 in yuv420p with the moov atom first, which every browser,
VS Code, VLC and W&B play. The encoder is the ffmpeg binary inside the ``imageio-ffmpeg`` wheel (a dependency of
Procgen's gym3, which pins 0.3.x, and of this project), run directly as a subprocess: nothing has to be installed
on the system, and imageio-ffmpeg's Python module (whose 0.3 release imports ``pkg_resources``, gone from current
setuptools) is not imported. ``IMAGEIO_FFMPEG_EXE`` names another ffmpeg. Where no ffmpeg is found, the file is an
animated GIF written with Pillow. TensorBoard's image dashboard plays animated GIFs but not MP4 (its
``add_video`` writes a GIF too), so TensorBoard always gets the GIF (`tensorboard_gif_summary`).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

FPS = 20  # 50 ms a frame: GIF stores centiseconds, so every frame's duration is exact
MP4_SCALE = 4  # 64x64 Procgen frames -> 256x256 (nearest neighbour): small in a browser otherwise; H.264 stays small
GIF_SCALE = 2


def _check(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")


def _scaled(frames: np.ndarray, scale: int) -> np.ndarray:
    _check(frames)
    return frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames


@functools.cache
def ffmpeg_exe() -> str | None:
    """The ffmpeg binary: ``IMAGEIO_FFMPEG_EXE``, else the one shipped in the imageio-ffmpeg wheel (found without
    importing the package), else None."""
    given = os.environ.get("IMAGEIO_FFMPEG_EXE")
    if given:
        return given
    spec = importlib.util.find_spec("imageio_ffmpeg")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(p for p in (Path(folder) / "binaries").glob("ffmpeg-*") if os.access(p, os.X_OK))
        if found:
            return str(found[-1])
    return None


def video_suffix() -> str:
    """``.mp4`` where an H.264 encoder is available, else ``.gif``."""
    return ".mp4" if ffmpeg_exe() is not None else ".gif"


def gif_bytes(frames: np.ndarray, fps: int = FPS, scale: int = GIF_SCALE) -> bytes:
    """Encode (T, H, W, 3) uint8 frames as a looping GIF (pixels repeated ``scale`` times, nearest neighbour)."""
    images = [Image.fromarray(f) for f in _scaled(frames, scale)]
    buf = io.BytesIO()
    # every frame is kept (no optimisation that merges identical frames), so the frame count is T
    # Pillow stores a run of identical frames once with their summed duration: the playback time is unchanged
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False)  # fmt: skip
    return buf.getvalue()


def write_gif(frames: np.ndarray, path: Path, fps: int = FPS, scale: int = GIF_SCALE) -> Path:
    """Write ``frames`` to ``path`` as a GIF (atomically: a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gif_bytes(frames, fps, scale))
    os.replace(tmp, path)
    return path


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS, scale: int = MP4_SCALE) -> Path:
    """Write ``frames`` to ``path`` as H.264 MP4 (yuv420p, CRF 18, faststart), atomically.

    Raises:
        RuntimeError: if imageio-ffmpeg is not installed.
    """
    exe = ffmpeg_exe()
    if exe is None:
        raise RuntimeError("MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); write_video falls back to GIF")
    big = _scaled(frames, scale)
    if big.shape[1] % 2 or big.shape[2] % 2:  # yuv420p needs even sides: repeat the last row / column
        big = np.pad(big, ((0, 0), (0, big.shape[1] % 2), (0, big.shape[2] % 2), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")  # ffmpeg picks the container from the suffix
    size = f"{big.shape[2]}x{big.shape[1]}"
    cmd = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", size, "-r", str(fps),
           "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart",
           str(tmp)]  # fmt: skip
    done = subprocess.run(cmd, input=np.ascontiguousarray(big).tobytes(), capture_output=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg could not write {path}: {done.stderr.decode(errors='replace').strip()}")
    os.replace(tmp, path)
    return path


def write_video(frames: np.ndarray, stem: Path, fps: int = FPS) -> Path:
    """Write ``stem`` + `video_suffix`: MP4 where imageio-ffmpeg is installed, else GIF. Returns the path."""
    if video_suffix() == ".mp4":
        return write_mp4(frames, stem.with_name(stem.name + ".mp4"), fps)
    return write_gif(frames, stem.with_name(stem.name + ".gif"), fps)


def mp4_info(path: Path) -> tuple[int, str, tuple[int, int], float]:
    """Decode an MP4 with ffmpeg: (frames decoded, codec line, (width, height), fps)."""
    frames, (width, height), codec, fps = _decode(path)
    return len(frames), codec, (width, height), fps


def decode_frames(path: Path) -> np.ndarray:
    """Every frame of a video file as (T, H, W, 3) uint8 RGB, decoded by ffmpeg."""
    return _decode(path)[0]


def _decode(path: Path) -> tuple[np.ndarray, tuple[int, int], str, float]:
    exe = ffmpeg_exe()
    if exe is None:
        raise RuntimeError("decoding an MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg)")
    done = subprocess.run([exe, "-hide_banner", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                          capture_output=True, check=True)  # fmt: skip
    info = done.stderr.decode(errors="replace")
    stream = re.search(r"Video: (.+)", info)
    size = re.search(r", (\d+)x(\d+)", stream.group(1)) if stream else None
    rate = re.search(r"([\d.]+) fps", info)
    if stream is None or size is None or rate is None:
        raise RuntimeError(f"ffmpeg found no video stream in {path}")
    width, height = int(size.group(1)), int(size.group(2))
    frames = np.frombuffer(done.stdout, dtype=np.uint8).reshape(-1, height, width, 3)
    return frames, (width, height), stream.group(1).strip(), float(rate.group(1))


def count_frames(path: Path, fps: int = FPS) -> int:
    """Frames in a video file: an MP4's decoded frames, or a GIF's total duration over one frame's at ``fps``
    (identical consecutive GIF frames are stored once, with their summed duration)."""
    if path.suffix == ".mp4":
        return mp4_info(path)[0]
    total = 0
    with Image.open(path) as image:
        for i in range(int(getattr(image, "n_frames", 1))):
            image.seek(i)
            total += int(image.info.get("duration", 0))
    return round(total * fps / 1000)


def tensorboard_gif_summary(tag: str, frames: np.ndarray, fps: int = FPS, scale: int = GIF_SCALE) -> object:
    """A TensorBoard image summary holding an animated GIF: what ``SummaryWriter.add_video`` writes, without its
    moviepy dependency (TensorBoard's image dashboard plays it). Add it with
    ``writer._get_file_writer().add_summary(summary, step)``."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    t, h, w, c = frames.shape
    encoded = gif_bytes(frames, fps, scale)
    image = Summary.Image(height=h * scale, width=w * scale, colorspace=c, encoded_image_string=encoded)
    return Summary(value=[Summary.Value(tag=tag, image=image)])
