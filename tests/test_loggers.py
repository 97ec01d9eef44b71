"""Videos and loggers (issue 17): MP4 files decode to their frame count; a tiny real fit's TensorBoard events (read
with TensorBoard's own reader) and W&B offline run (read back from its transaction log) hold the documented metric
names, env steps as the x axis, and the evaluation videos."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_args
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from driml_pl import video
from driml_pl.cli import main
from driml_pl.tools.plots import format_env_steps

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
SETS = ("train_levels", "test_levels")
EVAL = {
    "--data.env.game": "fruitbot",  # random-policy episodes of ~60 steps: rollout/episode_return is logged
    "--data.eval_every_env_steps": 256,
    "--data.eval_max_steps": 60,
    "--data.eval_test_levels": 10,
    "--data.eval_video_every": 1,
    "--data.eval_video_frames": 25,
}
DOCUMENTED = [  # README "Metrics" (DRIML-randk, no DRIML-ada terms)
    "train/c51_loss", "train/nce_gg", "train/q_mean", "train/loss", "rollout/episode_return", "rollout/episode_length",
    "rollout/episodes", "rollout/epsilon", "rollout/env_steps", "perf/env_steps_per_s", "perf/updates_per_s",
    "horizon/k_mean", "horizon/k_frac_1", "horizon/k_frac_2", "eval/env_steps",
    *[f"eval/{s}_{m}" for s in SETS for m in ("return", "return_std", "episodes", "capped", "length")],
]  # fmt: skip


def _frames(n: int) -> np.ndarray:
    """n frames of flat colour blocks (H.264 keeps them within a few levels), moving one block per frame."""
    frames = np.zeros((n, 64, 64, 3), dtype=np.uint8)
    for t in range(n):
        frames[t, :, :, 0] = 40
        frames[t, 16:48, (t % 4) * 16 : (t % 4) * 16 + 16] = (220, 180, 30)
    return frames


def test_mp4_is_h264_and_decodes_to_its_frame_count(tmp_path: Path) -> None:
    frames = _frames(23)
    path = video.write_video(frames, tmp_path / "clip")
    assert path == tmp_path / "clip.mp4" and not list(tmp_path.glob("*.tmp*"))
    count, codec, size, fps = video.mp4_info(path)
    assert (count, size, fps) == (23, (256, 256), 20.0) and codec.startswith("h264")
    assert video.count_frames(path) == 23
    decoded = video.decode_frames(path)[0]
    expected = frames[0].repeat(4, axis=0).repeat(4, axis=1)
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 3.0  # the first frame, as encoded


def test_gif_where_no_encoder_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: None)  # as on an install without imageio-ffmpeg
    path = video.write_video(_frames(9), tmp_path / "clip")
    assert path.suffix == ".gif" and video.count_frames(path) == 9
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        video.write_mp4(_frames(2), tmp_path / "x.mp4")


def test_env_step_axis_reads_at_a_glance() -> None:
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 192_000], [0, 1])
    format_env_steps(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if 0 <= t.get_position()[0] <= 192_000]
    assert labels == ["0", "50k", "100k", "150k"]
    ax.set_xlim(0, 50e6)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "10M", "20M", "30M", "40M", "50M"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny real fit with evaluation videos, TensorBoard and (when installed) W&B in offline mode."""
    root = tmp_path_factory.mktemp("loggers")
    run = root / "run"
    extra: dict[str, Any] = dict(EVAL)
    with pytest.MonkeyPatch.context() as mp:
        if HAVE_WANDB:
            extra["--wandb_project"] = "driml-test"
            for key, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
                mp.setenv(key, str(root / sub))
            mp.setenv("WANDB_MODE", "offline")
            mp.setenv("WANDB_SILENT", "true")
        main(tiny_args(run, budget=512, **extra))
        if HAVE_WANDB:  # a CLI process flushes the run's log when it exits; in-process, finish the run
            import wandb

            wandb.finish()
    return run


def _csv(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _gif_frames(encoded: bytes) -> int:
    with Image.open(io.BytesIO(encoded)) as image:
        assert image.format == "GIF"
        return int(getattr(image, "n_frames", 1))


@pytest.mark.slow
def test_tensorboard_events_hold_the_documented_metrics_against_env_steps(logged: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged / "logs" / "version_0"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    missing = [name for name in DOCUMENTED if name not in tags["scalars"]]
    assert not missing
    # the x axis (TensorBoard's step) is the run's global env steps: rollout/env_steps lies on the diagonal
    env = acc.Scalars("rollout/env_steps")
    assert len(env) > 5 and all(e.step == int(e.value) for e in env)
    rows = _csv(logged)
    csv_env = sorted({int(float(r["rollout/env_steps"])) for r in rows if r.get("rollout/env_steps")})
    assert sorted({e.step for e in acc.Scalars("train/c51_loss")}) == csv_env
    evals = [int(float(r["eval/env_steps"])) for r in rows if r.get("eval/env_steps")]
    assert [e.step for e in acc.Scalars("eval/train_levels_return")] == evals == [e.step for e in acc.Scalars(
        "eval/env_steps")] and evals[-1] == 512  # fmt: skip
    assert [int(e.value) for e in acc.Scalars("trainer/global_step")][-1] == int(rows[-1]["step"])
    # the evaluation videos: animated GIFs (what TensorBoard's image dashboard plays), one per evaluation and set
    for name in SETS:
        images = acc.Images(f"eval/{name}_video")
        assert [im.step for im in images] == evals
        for im in images:
            assert im.encoded_image_string[:6] == b"GIF89a" and (im.width, im.height) == (128, 128)
            assert 1 <= _gif_frames(im.encoded_image_string) <= 25
    # and the files on disk are H.264 MP4s of the same frames
    mp4s = sorted((logged / "videos").glob("*.mp4"))
    assert [p.name.split("_return")[0] for p in mp4s] == [f"eval_{s}_step{n:010d}" for s in sorted(SETS)
                                                          for n in evals]  # fmt: skip
    for path in mp4s:
        count, codec, size, _ = video.mp4_info(path)
        assert codec.startswith("h264") and size == (256, 256) and 1 <= count <= 25


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log (``run-*.wandb``): a LevelDB-style log of 32 KiB blocks after a 7-byte
    ``:W&B`` header; each chunk has a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and
    the chunks of a record, joined, are a serialised ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install -e .[wandb])")
def test_wandb_offline_run_holds_config_metrics_and_videos(logged: Path) -> None:
    (run_dir,) = (logged / "logs" / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    config: dict[str, Any] = {}
    history: dict[str, list[Any]] = {}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        config |= {item.key: json.loads(item.value_json) for item in updates}
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    # the run's config: the model's and the data module's settings as given on the command line
    assert config["lambda_gg"] == 1.0 and config["total_env_steps"] == 512 and config["game"] == "fruitbot"
    assert config["eval_video_every"] == 1 and config["batch_size"] == 16
    missing = [name for name in DOCUMENTED if name not in history]
    assert not missing
    assert history["rollout/env_steps"][-1] == 512  # pick rollout/env_steps as the x axis in the W&B UI
    evals = [int(float(r["eval/env_steps"])) for r in _csv(logged) if r.get("eval/env_steps")]
    for name in SETS:
        assert history[f"eval/{name}_video/_type"] == ["videos"] * len(evals)
        files = sorted(run_dir.glob(f"files/media/videos/eval/{name}_video_*.mp4"))
        assert len(files) == len(evals)
        for path in files:
            count, codec, _, _ = video.mp4_info(path)
            assert codec.startswith("h264") and 1 <= count <= 25


def test_run_plot_reference_lines(tmp_path: Path) -> None:
    from driml_pl.tools.plots import plot_run, references

    version = tmp_path / "run" / "logs" / "version_0"
    version.mkdir(parents=True)
    env = {"game": "fruitbot", "num_levels": 1, "start_level": 0, "distribution_mode": "easy"}
    model = {"lambda_ll": 0.0, "lambda_lg": 0.0, "lambda_gl": 0.0, "lambda_gg": 0.0}
    (version / "config.yaml").write_text(json.dumps({"model": model, "data": {"env": env}}))  # JSON is YAML
    (version / "metrics.csv").write_text("rollout/env_steps,rollout/episode_return,step\n1000,-3.0,1\n2000,-2.0,2\n")
    # the quickstart level set's random-policy return (README "Learning") and the paper's fruitbot C51 value
    assert references(tmp_path / "run") == {"random policy": -3.37, "paper C51, 50M env steps": 3.86}
    env["num_levels"] = 200  # a level set without a measured random policy: only the paper's line
    (version / "config.yaml").write_text(json.dumps({"model": {**model, "lambda_gg": 1.0},
                                                     "data": {"env": env, "horizon": {"mode": "fixed"}}}))  # fmt: skip
    assert references(tmp_path / "run") == {"paper DRIML-fix, 50M env steps": 5.4}
    with Image.open(plot_run(tmp_path / "run")) as image:
        assert image.format == "PNG" and image.size == (1500, 440)
