"""`python -m driml_pl fit|validate|test --config conf/....yaml`: LightningCLI with the project's defaults."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from driml_pl.callbacks import DRIMLProgressBar
from driml_pl.data import DRIMLDataModule
from driml_pl.module import DRIML


def _seed(seed_everything: bool | int) -> int:
    if isinstance(seed_everything, bool):
        raise ValueError("seed_everything must be an integer for driml_pl runs (it seeds Procgen), got a bool")
    return int(seed_everything)


def _next_version(logs: Path) -> str:
    taken = [int(p.name.split("_")[1]) for p in logs.glob("version_*") if p.name.split("_")[1].isdigit()]
    return f"version_{max(taken, default=-1) + 1}"


def _is_adaptive(mode: str) -> bool:
    return mode == "adaptive"


class DRIMLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.frame_stack", "model.frame_stack")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed)
        parser.link_arguments("data.horizon.mode", "model.adaptive_horizon", compute_fn=_is_adaptive)
        parser.link_arguments("data.env.game", "model.game")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Lay the run directory out under ``trainer.default_root_dir`` unless the config sets loggers/checkpoints.

        ``<root>/logs/version_N/`` holds config.yaml, metrics.csv and TensorBoard events (a resume opens a new
        version; nothing is overwritten). ``<root>/checkpoints/`` holds last.ckpt, written at every epoch end (every
        ``data.updates_per_epoch`` updates) and at the end of the budget, plus the per-rank stream state.
        """
        root = Path(self._expand(str(config.get("default_root_dir") or "runs/driml")))
        config["default_root_dir"] = str(root)
        if config.get("logger") in (None, True):
            version = _next_version(root / "logs")
            config["logger"] = [
                CSVLogger(root, name="logs", version=version),
                TensorBoardLogger(root, name="logs", version=version),
            ]
        given = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, ModelCheckpoint)]
        if not given and config.get("enable_checkpointing") is not False:
            last = ModelCheckpoint(root / "checkpoints", save_last=True, save_top_k=0, every_n_epochs=1)
            callbacks = [*callbacks, last]
        return super()._instantiate_trainer(config, callbacks)

    def _expand(self, template: str) -> str:
        """``{game}`` and ``{seed}`` in trainer.default_root_dir become the run's game and seed."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        return template.format(game=config.data.env.game, seed=config.seed_everything)

    def before_fit(self) -> None:
        """Check what can fail before anything is written; refuse to start a fresh run on another run's checkpoints."""
        self.datamodule.check_budget(self.trainer.world_size)
        if self.config_init[self.subcommand].get("ckpt_path"):
            return
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            dirpath = getattr(callback, "dirpath", None)
            if isinstance(callback, ModelCheckpoint) and dirpath and (Path(dirpath) / "last.ckpt").exists():
                raise ValueError(
                    f"{dirpath} already holds last.ckpt from an earlier run; resume it with --ckpt_path last "
                    "or pick another --trainer.default_root_dir"
                )


TRAINER_DEFAULTS = {
    "default_root_dir": "runs/driml",
    "max_epochs": -1,  # the env-step budget (data.total_env_steps) ends the run
    "num_sanity_val_steps": 0,
    "check_val_every_n_epoch": 1,
    "log_every_n_steps": 50,
    "callbacks": [lazy_instance(DRIMLProgressBar)],
}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["report"]:
        from driml_pl.report import main as report_main

        raise SystemExit(report_main(argv[1:]))
    try:
        DRIMLCLI(
            DRIML,
            DRIMLDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            args=args,
            auto_configure_optimizers=False,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"driml_pl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
