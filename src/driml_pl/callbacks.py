"""Non-essential run furniture: the run's progress bar, evaluation videos, the end-of-fit plot."""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import Callback
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from driml_pl.types import step_stats


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    days, s = divmod(s, 86_400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


class DRIMLProgressBar(ProgressBar):
    """The run, not the epoch: env steps toward the budget (``data.total_env_steps``) with the run's ETA, updates,
    updates/s, env steps/s and the mean return of the last 100 episodes.

    On a terminal it is a Rich bar redrawn at most every ``refresh_s`` seconds; otherwise (a batch job, a pipe) it
    prints one plain line every ``log_every_s`` seconds and at the end. During the run the counts are read from the
    step's batch (`driml_pl.types.step_stats`: the env steps collected and the mean return when its last minibatch
    was drawn), sampled at most once a second; the rates (and so the ETA) are measured over the last ``window_s``
    seconds. The final line gives the whole run's mean rates (of this process: since the start or the resume) and
    its elapsed time. ``--trainer.enable_progress_bar false`` turns it off.

    Args:
        refresh_s: seconds between redraws of the Rich bar.
        log_every_s: seconds between plain lines without a terminal.
        window_s: seconds over which the rates (and so the ETA) are measured.
        terminal: force the Rich bar (True) or plain lines (False); None: Rich iff stdout is a terminal.
        console: the Rich console to draw on (default: a new one on stdout).
    """

    def __init__(
        self,
        refresh_s: float = 0.5,
        log_every_s: float = 60.0,
        window_s: float = 60.0,
        terminal: bool | None = None,
        console: Console | None = None,
    ) -> None:
        super().__init__()
        self.refresh_s, self.log_every_s, self.window_s, self.terminal = refresh_s, log_every_s, window_s, terminal
        self.console = console
        self.total = 0  # the global env-step budget
        self.env_steps = 0
        self.lines: list[str] = []  # plain lines printed (kept for tests and post-mortems; one a minute)
        self._enabled = True
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._next = 0.0  # next redraw / plain line
        self._next_sample = 0.0
        self._samples: deque[tuple[float, int, int]] = deque()  # (monotonic time, env steps, updates)
        self._start: tuple[float, int, int] = (0.0, 0, 0)
        self._return = math.nan
        self._played: list[str] = []  # level sets evaluated in the current validation run
        self._eval_steps = -1

    # ---------------------------------------------------------------------------------------- ProgressBar API
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.console.print(*args, **kwargs)
        else:
            print(*args, **kwargs, flush=True)

    # ----------------------------------------------------------------------------------------------- training
    def _interval(self) -> float:
        return self.refresh_s if self._progress is not None else self.log_every_s

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        self.total = int(getattr(datamodule, "total_env_steps", 0))
        stream = getattr(datamodule, "stream", None)
        self.env_steps = int(stream.collector.env_steps) * trainer.world_size if stream is not None else 0
        if stream is not None:
            self._return = float(stream.collector.mean_return())
        now = time.monotonic()
        self._start = (now, self.env_steps, trainer.global_step)
        self._samples = deque([self._start])
        if not self._enabled:
            return
        terminal = sys.stdout.isatty() if self.terminal is None else self.terminal
        if terminal:
            self._progress = Progress(
                TextColumn("[bold]env steps"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console or Console(),
                auto_refresh=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("run", total=self.total, completed=self.env_steps, info="")
        self._next = self._next_sample = now + self._interval()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        if now < self._next_sample or not self._enabled:
            return  # the cost on most steps: one clock read
        self._next_sample = now + min(1.0, self._interval())
        self._read(trainer, batch, now)
        if now >= self._next:
            self._next = now + self._interval()
            self._show()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        datamodule = getattr(trainer, "datamodule", None)
        stream = getattr(datamodule, "stream", None)
        if stream is not None:
            self.env_steps = int(stream.collector.env_steps) * trainer.world_size
            self._return = float(stream.collector.mean_return())
        self._samples.append((time.monotonic(), self.env_steps, trainer.global_step))
        self._show(final=True)
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()  # Lightning skips teardown hooks then: end the Rich line before the CLI prints its last one

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _read(self, trainer: pl.Trainer, batch: Any, now: float) -> None:
        stats = step_stats(batch)  # the step's minibatches (a tuple of Batch), not a bare Batch
        if stats is not None:
            self.env_steps = int(stats.env_steps) * trainer.world_size
            self._return = float(stats.episode_return)
        self._samples.append((now, self.env_steps, trainer.global_step))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()  # the oldest kept sample is the newest one at least window_s old

    def summary(self, final: bool = False) -> str:
        """Mid-run: ``updates 1,234 (2.1/s) | 68 env steps/s | return 3.21 | ETA 8d 2:33:00``, the rates over the
        last ``window_s`` seconds. ``final``: the rates over the whole run and ``elapsed 0:10:00`` instead of the ETA.
        """
        (t0, e0, u0), (t1, e1, u1) = (self._start if final else self._samples[0]), self._samples[-1]
        dt = t1 - t0
        steps_rate = (e1 - e0) / dt if dt > 0 else math.nan
        updates_rate = (u1 - u0) / dt if dt > 0 else math.nan
        eta = (self.total - self.env_steps) / steps_rate if steps_rate > 0 else math.nan
        ret = "-" if math.isnan(self._return) else f"{self._return:.2f}"
        when = f"elapsed {_duration(t1 - self._start[0])}" if final else f"ETA {_duration(eta)}"
        steps = "?" if math.isnan(steps_rate) else f"{steps_rate:,.0f}"
        updates = "?" if math.isnan(updates_rate) else f"{updates_rate:.1f}"
        return f"updates {u1:,} ({updates}/s) | {steps} env steps/s | return {ret} | {when}"

    def _show(self, final: bool = False) -> None:
        if not self._samples:
            return
        info = self.summary(final)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.env_steps, info=info)
            self._progress.refresh()
        else:
            pct = 100.0 * self.env_steps / self.total if self.total else math.nan
            line = f"driml_pl: {self.env_steps:,}/{self.total:,} env steps ({pct:.1f}%) | {info}"
            self.lines.append(line)
            print(line, flush=True)

    # --------------------------------------------------------------------------------------------- evaluation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._played = []
        self._eval_steps = -1

    on_test_start = on_validation_start

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(batch, dict) and "level_set" in batch:
            self._played.append(str(batch["level_set"]))
            self._eval_steps = int(batch.get("env_steps", -1))

    on_test_batch_end = on_validation_batch_end

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_eval(trainer, "eval")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_eval(trainer, "test")

    def _report_eval(self, trainer: pl.Trainer, prefix: str) -> None:
        """One line per level set evaluated (fit only: validate/test print a table)."""
        if not self._enabled or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        for name in self._played:
            key = f"{prefix}/{name}"
            if f"{key}_return" not in metrics:
                continue
            self.print(
                f"driml_pl: {key}: return {float(metrics[f'{key}_return']):.2f} +- "
                f"{float(metrics[f'{key}_return_std']):.2f} over {int(metrics[f'{key}_episodes'])} episodes "
                f"({int(metrics[f'{key}_capped'])} capped) at {self._eval_steps:,} env steps"
            )


class EvalVideos(Callback):
    """Writes the recorded evaluation episode of each level set (``data.eval_video_every``) to
    ``<run>/videos/<eval|test>_<level set>_step<env steps>_return<R>.mp4`` (H.264; ``.gif`` where imageio-ffmpeg is
    missing, `driml_pl.video`), to TensorBoard as an animated GIF under ``<eval|test>/<level set>_video``, and to W&B
    as the MP4 under the same key, when those loggers are on.

    R is the episode's return (up to the step cap); the video holds at most ``data.eval_video_frames`` frames.
    """

    def __init__(self) -> None:
        self.written: list[Path] = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._write(trainer, "eval", batch)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._write(trainer, "test", batch)

    def _write(self, trainer: pl.Trainer, prefix: str, batch: Any) -> None:
        if not trainer.is_global_zero or not isinstance(batch, dict) or "frames" not in batch:
            return
        from driml_pl.video import tensorboard_gif_summary, write_video

        frames = batch["frames"].cpu().numpy()
        ret = float(batch["episode_return"][0])
        steps = int(batch["env_steps"])
        when = f"step{steps:010d}" if steps >= 0 else f"update{trainer.global_step:08d}"
        stem = Path(trainer.default_root_dir) / "videos" / f"{prefix}_{batch['level_set']}_{when}_return{ret:+.2f}"
        path = write_video(frames, stem)
        self.written.append(path)
        tag = f"{prefix}/{batch['level_set']}_video"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # TensorBoard plays GIFs, not MP4
                writer = logger.experiment._get_file_writer()
                writer.add_summary(tensorboard_gif_summary(tag, frames), max(steps, trainer.global_step))
            elif isinstance(logger, WandbLogger):  # the file itself: W&B plays MP4 (and GIF)
                logger.log_video(tag, [str(path)], step=trainer.global_step)


class RunPlot(Callback):
    """At the end of ``fit``, draws ``<run>/plot.png`` from the run's metrics.csv (`driml_pl.tools.plots`)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv is None or Path(csv.root_dir).name != "logs":
            return
        from driml_pl.tools.plots import plot_run

        for logger in trainer.loggers:
            logger.save()
        try:
            self.path = plot_run(Path(csv.root_dir).parent)
        except Exception as err:  # a plot must never fail a finished run
            rank_zero_warn(f"driml_pl: the run's plot was not written: {err!r}")
