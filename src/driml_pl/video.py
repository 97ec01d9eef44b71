"""Evaluation videos: MP4 (H.264) files through imageio-ffmpeg, animated GIFs for TensorBoard (and as the fallback).

Files on disk (``<run>/videos/``) and in W&B are MP4: H.264 in yuv420p with the moov atom first, which every browser,
VS Code, VLC and W&B play. The encoder is the ffmpeg binary inside the ``imageio-ffmpeg`` wheel (a project
dependency), so nothing has to be installed on the system. Where imageio-ffmpeg (or its binary) is missing, the
file is an animated GIF written with Pillow. TensorBoard's image dashboard plays animated GIFs but not MP4 (its
``add_video`` writes a GIF too), so TensorBoard always gets the GIF (`tensorboard_gif_summary`).
"""

from __future__ import annotations

import functools
import io
import os
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
    """The ffmpeg binary shipped in the imageio-ffmpeg wheel, or None when imageio-ffmpeg is not usable."""
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:  # not installed, or an old release that cannot find its binary
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
    if ffmpeg_exe() is None:
        raise RuntimeError("MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); write_video falls back to GIF")
    import imageio_ffmpeg

    big = _scaled(frames, scale)
    if big.shape[1] % 2 or big.shape[2] % 2:  # yuv420p needs even sides: repeat the last row / column
        big = np.pad(big, ((0, 0), (0, big.shape[1] % 2), (0, big.shape[2] % 2), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")  # ffmpeg picks the container from the suffix
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (big.shape[2], big.shape[1]), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
        quality=None, macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", "18", "-movflags",
        "+faststart"],
    )  # fmt: skip
    writer.send(None)
    for frame in big:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    os.replace(tmp, path)
    return path


def write_video(frames: np.ndarray, stem: Path, fps: int = FPS) -> Path:
    """Write ``stem`` + `video_suffix`: MP4 where imageio-ffmpeg is installed, else GIF. Returns the path."""
    if video_suffix() == ".mp4":
        return write_mp4(frames, stem.with_name(stem.name + ".mp4"), fps)
    return write_gif(frames, stem.with_name(stem.name + ".gif"), fps)


def mp4_info(path: Path) -> tuple[int, str, tuple[int, int], float]:
    """Decode an MP4 with ffmpeg (imageio-ffmpeg): (frames decoded, codec line, (width, height), fps)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    count = sum(1 for _ in reader)
    width, height = meta["size"]
    return count, str(meta.get("codec", "")), (int(width), int(height)), float(meta["fps"])


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
