"""Non-essential run furniture: the Rich progress bar."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

_SHOWN = {
    "rollout/env_steps": "env_steps",
    "perf/env_steps_per_s": "env_steps/s",
    "rollout/episode_return": "return",
}


class DRIMLProgressBar(RichProgressBar):
    """Rich bar showing env steps, updates, env steps per second and the recent mean episode return."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        shown: dict[str, Any] = {}
        for key, label in _SHOWN.items():
            if key in metrics:
                value = metrics[key]
                if not isinstance(value, (int, float)):
                    continue
                shown[label] = f"{float(value):,.0f}" if label != "return" else f"{float(value):.2f}"
        shown["updates"] = f"{trainer.global_step:,}"
        return shown
