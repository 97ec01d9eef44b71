"""TensorBoard against env steps: the x axis (TensorBoard's "step") of every scalar is the run's global env steps.

Lightning's TensorBoardLogger writes each row at the Lightning step (one step = ``data.updates_per_batch`` updates),
which does not compare across configs (env counts, replay ratios) and is not what the paper plots. This logger
writes each row at its own ``rollout/env_steps`` (training rows) or ``eval/env_steps`` (evaluation rows); a row with
neither (``validate``/``test`` without a training stream, or a row of train metrics alone) takes the last env steps
seen, and the Lightning step when none was. The Lightning step stays available as the scalar
``trainer/global_step``. The CSV logger is unchanged (every row keeps ``step`` and ``rollout/env_steps`` columns).
"""

from __future__ import annotations

from collections.abc import Mapping

from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

X_KEYS = ("rollout/env_steps", "eval/env_steps")


class EnvStepsTensorBoardLogger(TensorBoardLogger):
    """`TensorBoardLogger` whose step is the run's global env steps (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.last_env_steps: int | None = None

    def env_steps_for(self, metrics: Mapping[str, float], step: int | None) -> int | None:
        """The x of a row: its env steps, else the last seen, else the Lightning ``step``."""
        for key in X_KEYS:
            value = metrics.get(key)
            if value is not None and float(value) >= 0:
                self.last_env_steps = int(float(value))
                return self.last_env_steps
        return self.last_env_steps if self.last_env_steps is not None else step

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        x = self.env_steps_for(metrics, step)
        row = dict(metrics)
        if step is not None:
            row["trainer/global_step"] = step
        super().log_metrics(row, x)
