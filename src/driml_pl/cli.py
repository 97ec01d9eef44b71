"""`python -m driml_pl fit|validate|test --config conf/....yaml`: LightningCLI with the project's defaults."""

from __future__ import annotations

import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from driml_pl.callbacks import DRIMLProgressBar
from driml_pl.checks import check_config, describe_parse_error
from driml_pl.data import DRIMLDataModule
from driml_pl.module import DRIML


def _seed(seed_everything: bool | int) -> int:
    if isinstance(seed_everything, bool):
        raise ValueError(f"seed_everything={seed_everything} is not allowed: an integer (it seeds Procgen)")
    return int(seed_everything)


def _next_version(logs: Path) -> str:
    taken = [int(p.name.split("_")[1]) for p in logs.glob("version_*") if p.name.split("_")[1].isdigit()]
    return f"version_{max(taken, default=-1) + 1}"


def _is_adaptive(mode: str) -> bool:
    return mode == "adaptive"


class DRIMLCLI(LightningCLI):
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parse errors raise (no usage dump) so `parse_arguments` can report them in one line; no abbreviated keys,
        so a misspelt key is refused instead of silently setting another one."""
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check every value (`driml_pl.checks`) before anything is built, printed or written."""
        given = sys.argv[1:] if args is None else args
        argv = [str(a) for a in given] if isinstance(given, list | tuple) else []
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            sub = next((a for a in argv if a in self.subcommands()), None)
            known = self._known_keys(sub)
            raise ValueError(describe_parse_error(str(err), argv, known)) from None
        self._check()

    def _known_keys(self, subcommand: str | None) -> list[str]:
        parsers = getattr(self, "_subcommand_parsers", {})
        parser = parsers.get(subcommand) if subcommand else self.parser
        actions = getattr(parser, "_actions", [])
        return [a.dest for a in actions if a.dest not in ("help", "config", "print_config", "==SUPPRESS==")]

    def _check(self) -> None:
        subcommand = self.config.get("subcommand")
        check_config(self.config[subcommand] if subcommand else self.config)

    def before_instantiate_classes(self) -> None:
        """Check again: a --ckpt_path may have brought the checkpoint's model hyper-parameters in since parsing."""
        self._check()

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
