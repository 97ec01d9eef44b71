"""Evaluation videos as animated GIFs, written with Pillow (a matplotlib dependency: nothing extra to install).

GIF rather than MP4: no ffmpeg is needed, every browser and TensorBoard play it, and 64x64 Procgen frames stay small
(about 2-4 kB a frame).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

FPS = 20  # 50 ms a frame: GIF stores centiseconds, so every frame's duration is exact


def _images(frames: np.ndarray, scale: int) -> list[Image.Image]:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return [Image.fromarray(f) for f in frames]


def gif_bytes(frames: np.ndarray, fps: int = FPS, scale: int = 2) -> bytes:
    """Encode (T, H, W, 3) uint8 frames as a looping GIF (pixels repeated ``scale`` times, nearest neighbour)."""
    images = _images(frames, scale)
    buf = io.BytesIO()
    # every frame is kept (no optimisation that merges identical frames), so the frame count is T
    # Pillow stores a run of identical frames once with their summed duration: the playback time is unchanged
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False)  # fmt: skip
    return buf.getvalue()


def write_gif(frames: np.ndarray, path: Path, fps: int = FPS, scale: int = 2) -> Path:
    """Write ``frames`` to ``path`` (atomically: a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gif_bytes(frames, fps, scale))
    os.replace(tmp, path)
    return path


def count_frames(path: Path, fps: int = FPS) -> int:
    """Frames at ``fps`` in a GIF file, decoded with Pillow: its total duration over one frame's (identical
    consecutive frames are stored once, with their summed duration)."""
    total = 0
    with Image.open(path) as image:
        for i in range(int(getattr(image, "n_frames", 1))):
            image.seek(i)
            total += int(image.info.get("duration", 0))
    return round(total * fps / 1000)


def tensorboard_gif_summary(tag: str, frames: np.ndarray, fps: int = FPS, scale: int = 2) -> object:
    """A TensorBoard image summary holding an animated GIF: what ``SummaryWriter.add_video`` writes, without its
    moviepy dependency. Add it with ``writer._get_file_writer().add_summary(summary, step)``."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    t, h, w, c = frames.shape
    encoded = gif_bytes(frames, fps, scale)
    image = Summary.Image(height=h * scale, width=w * scale, colorspace=c, encoded_image_string=encoded)
    return Summary(value=[Summary.Value(tag=tag, image=image)])
