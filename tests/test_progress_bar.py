"""The run's progress bar in the middle of a real run (issue 19, part 1): what each line shows against what the stream
had collected at that step, in plain lines and on a Rich console, and the window of its rates, hand-computed."""

from __future__ import annotations

import io
import math
import re
import time
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import tiny_args
from pytorch_lightning import Callback
from rich.console import Console

from driml_pl.callbacks import DRIMLProgressBar
from driml_pl.cli import DRIML, DRIMLCLI, TRAINER_DEFAULTS, DRIMLDataModule
from driml_pl.types import Batch, RolloutStats, step_stats

BUDGET = 512
LINE = re.compile(
    r"driml_pl: (?P<steps>[\d,]+)/(?P<total>[\d,]+) env steps \((?P<pct>[\d.]+)%\) \| updates (?P<updates>[\d,]+) "
    r"\((?P<urate>[\d.]+)/s\) \| (?P<rate>[\d,]+) env steps/s \| return (?P<ret>\S+) \| (?P<when>ETA|elapsed) "
    r"(?P<hms>\d+:\d\d:\d\d)$"
)


def _seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


def _num(text: str) -> int:
    return int(text.replace(",", ""))


class _Truth(Callback):
    """After the bar (next in the callback list): what the stream really had at each step, and what the bar showed."""

    def __init__(self, bar: DRIMLProgressBar) -> None:
        self.bar = bar
        self.start: tuple[float, int] = (0.0, 0)
        self.steps: list[dict[str, Any]] = []
        self.end: dict[str, Any] = {}

    def _now(self, trainer: Any) -> dict[str, Any]:
        collector = trainer.datamodule.stream.collector
        task = self.bar._progress.tasks[0] if self.bar._progress is not None else None
        return {
            "t": time.monotonic(),
            "env_steps": int(collector.env_steps),
            "updates": trainer.global_step,
            "return": float(collector.mean_return()),
            "lines": len(self.bar.lines),
            "completed": None if task is None else task.completed,
            "percentage": None if task is None else task.percentage,
            "info": None if task is None else task.fields["info"],
        }

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = (time.monotonic(), int(trainer.datamodule.stream.collector.env_steps))

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.steps.append(self._now(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.end = self._now(trainer)


def _fit(run_dir: Any, bar: DRIMLProgressBar) -> _Truth:
    truth = _Truth(bar)

    class _WithBar(DRIMLCLI):
        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
            return super()._instantiate_trainer(config, [*callbacks, bar, truth])

    _WithBar(DRIML, DRIMLDataModule, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0,
             args=tiny_args(run_dir, budget=BUDGET), auto_configure_optimizers=False)  # fmt: skip
    return truth


def _ret(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


@pytest.mark.slow
def test_plain_lines_mid_run_show_what_the_stream_had_collected(tmp_path):
    # a line at every step; the rates over the whole run so far (a window longer than the run), checkable from outside
    bar = DRIMLProgressBar(log_every_s=0.0, window_s=1e9, terminal=False)
    truth = _fit(tmp_path / "run", bar)
    printed = [s for s in truth.steps if s["lines"]]
    assert len(printed) == len(truth.steps) > 20  # one line per step
    assert len(bar.lines) == len(truth.steps) + 1  # and the final one
    t0, e0 = truth.start
    middle = printed[len(printed) // 2 : len(printed) // 2 + 3]  # lines from the middle of the run, not the last
    for step in middle:
        match = LINE.match(bar.lines[step["lines"] - 1])
        assert match, bar.lines[step["lines"] - 1]
        assert 0 < step["env_steps"] < BUDGET
        assert _num(match["steps"]) == step["env_steps"]  # the env steps the stream had collected at that step
        assert _num(match["total"]) == BUDGET
        assert match["pct"] == f"{100 * step['env_steps'] / BUDGET:.1f}"
        assert _num(match["updates"]) == step["updates"] > 0
        assert match["ret"] == _ret(step["return"])
        rate = (step["env_steps"] - e0) / (step["t"] - t0)
        assert _num(match["rate"]) == pytest.approx(rate, rel=0.02, abs=1)
        assert float(match["urate"]) == pytest.approx(step["updates"] / (step["t"] - t0), rel=0.02, abs=0.1)
        assert match["when"] == "ETA"
        assert _seconds(match["hms"]) == pytest.approx((BUDGET - step["env_steps"]) / rate, abs=1.5)
    returns = [LINE.match(line)["ret"] for line in bar.lines[:-1]]  # type: ignore[index]
    assert any(r != "-" for r in returns)  # episodes finish during the run and the return is shown
    final = LINE.match(bar.lines[-1])
    assert final and final["when"] == "elapsed"
    assert _num(final["steps"]) == truth.end["env_steps"] == BUDGET
    # the final rate is the whole run's mean, not the last window's steps over a stale clock
    mean_rate = (truth.end["env_steps"] - e0) / (truth.end["t"] - t0)
    assert _num(final["rate"]) == pytest.approx(mean_rate, rel=0.03, abs=1)


@pytest.mark.slow
def test_rich_bar_mid_run_shows_env_steps_percentage_and_rates(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    bar = DRIMLProgressBar(refresh_s=0.0, window_s=1e9, terminal=True, console=console)
    truth = _fit(tmp_path / "run", bar)
    t0, e0 = truth.start
    middle = truth.steps[len(truth.steps) // 2]
    assert 0 < middle["env_steps"] < BUDGET
    assert middle["completed"] == middle["env_steps"]
    assert middle["percentage"] == pytest.approx(100 * middle["env_steps"] / BUDGET)
    info = middle["info"]
    assert info.startswith(f"updates {middle['updates']:,} (")
    rate = int(re.search(r"\| ([\d,]+) env steps/s", info)[1].replace(",", ""))  # type: ignore[index]
    assert rate == pytest.approx((middle["env_steps"] - e0) / (middle["t"] - t0), rel=0.02, abs=1)
    assert f"return {_ret(middle['return'])} | ETA " in info
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert f"{round(middle['percentage'])}%" in drawn and info in drawn  # the frame drawn at that step


def _batch(env_steps: int, ret: float) -> tuple[Batch, ...]:
    stats = RolloutStats(env_steps=env_steps, episodes=0, episode_return=ret, episode_length=0.0, epsilon=0.1)
    none: Any = None
    first = Batch(none, none, none, none, none, none, none, stats._replace(env_steps=env_steps - 8))
    return (first, Batch(none, none, none, none, none, none, none, stats))


def test_rates_cover_the_last_window_and_a_step_is_read_by_its_last_minibatch():
    bar = DRIMLProgressBar(window_s=60.0, terminal=False)
    bar.total = 100_000
    bar._start = (0.0, 0, 0)
    bar._samples.append(bar._start)
    world = SimpleNamespace(world_size=2, global_step=0)
    for now, env_steps, updates in ((30.0, 1_500, 300), (70.0, 5_000, 1_000), (100.0, 8_000, 1_700)):
        world.global_step = updates
        bar._read(world, _batch(env_steps, 2.5), now)  # type: ignore[arg-type]
    # at t=100 the oldest kept sample is t=30 (the newest one >= 60 s old): 2 ranks x (8,000 - 1,500) in 70 s
    assert bar.env_steps == 16_000
    assert bar.summary() == "updates 1,700 (20.0/s) | 186 env steps/s | return 2.50 | ETA 0:07:32"
    # 13,000 env steps / 70 s = 185.71/s; (100,000 - 16,000) / 185.71 = 452.3 s; 1,400 updates / 70 s
    assert bar.summary(final=True) == "updates 1,700 (17.0/s) | 160 env steps/s | return 2.50 | elapsed 0:01:40"
    assert step_stats(_batch(64, 1.0)).env_steps == 64  # type: ignore[union-attr]
    assert step_stats(("not", "a step")) is None and step_stats(()) is None
