"""`python -m driml_pl fit|validate|test --config conf/....yaml`: LightningCLI with the project's defaults.

The other commands (``plot``, ``report``, ``grid``), the top-level help and ``--version`` are `driml_pl.commands`'.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import warnings
from argparse import ArgumentError
from datetime import timedelta
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from rich.console import Console

from driml_pl import preflight, procgen_build
from driml_pl.callbacks import DRIMLProgressBar, EvalVideos, RunPlot
from driml_pl.checkpoint import CheckpointConfig, RunCheckpoint, check_resumable
from driml_pl.checkpoint.diskfull import DiskFullError, is_disk_full
from driml_pl.checkpoint.fork import checkpoint_settings, fork_overrides, settings_changes
from driml_pl.checkpoint.resume import (
    checkpoint_dir,
    choose_resumable,
    last_checkpoint,
    last_checkpoint_in,
    resume_path,
)
from driml_pl.checks import check_config, describe_parse_error
from driml_pl.commands import COMMANDS, DESCRIPTION, PROG, TRAINER_COMMANDS, dispatch
from driml_pl.data import DRIMLDataModule
from driml_pl.data.datamodule import resume_settings
from driml_pl.interrupt import Interrupted, on_ctrl_c, restore_ctrl_c
from driml_pl.learner import DRIML, NonFiniteLossError
from driml_pl.lifecycle import stopped
from driml_pl.loggers import EnvStepsTensorBoardLogger
from driml_pl.runlock import hold_for_fit, holds_run_lock, refuse_if_locked, release_fit_lock
from driml_pl.threads import set_torch_threads


def _seed(seed_everything: bool | int) -> int:
    if isinstance(seed_everything, bool):
        raise ValueError(f"seed_everything={seed_everything} is not allowed: an integer (it seeds Procgen)")
    return int(seed_everything)


def _next_version(logs: Path) -> str:
    taken = [int(p.name.split("_")[1]) for p in logs.glob("version_*") if p.name.split("_")[1].isdigit()]
    return f"version_{max(taken, default=-1) + 1}"


def _run_root(config: Any) -> str:
    """A parsed subcommand config's run directory, its ``{game}`` and ``{seed}`` filled in."""
    root = str(config.trainer.get("default_root_dir") or "runs/driml")
    return root.format(game=config.data.env.game, seed=config.seed_everything)


def _first_process_here() -> bool:
    """Whether this is the first process of the run on this machine (local rank 0: Lightning's launcher, torchrun or
    SLURM set the rank of the others before they parse)."""
    return int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0) == 0


def _is_adaptive(mode: str) -> bool:
    return mode == "adaptive"


class StopRanksOnError(Callback):
    """When rank 0 of a DDP run started by Lightning's subprocess launcher fails, it kills the ranks it started, so
    none is left waiting in a collective (Lightning itself does this only on Ctrl-C; a started rank that fails ends
    rank 0 through the launcher's process observer or the failed collective)."""

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            launcher.kill(signal.SIGKILL)  # SIGTERM does not end a process blocked in a collective


def _with_timeout(strategy: Any, seconds: float) -> Any:
    """A DDP strategy named by its registered string (``ddp``, ``ddp_spawn``, ...) with a collective timeout."""
    if isinstance(strategy, str) and strategy in StrategyRegistry:
        entry = StrategyRegistry[strategy]
        if isinstance(entry["strategy"], type) and issubclass(entry["strategy"], DDPStrategy):
            return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=seconds))
    return strategy


class DRIMLCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands but ``predict``, which needs a ``forward`` this LightningModule does not have."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINER_COMMANDS}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parse errors raise (no usage dump) so `parse_arguments` can report them in one line; no abbreviated keys,
        so a misspelt key is refused instead of silently setting another one."""
        quiet_warnings()
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("prog", PROG)  # not sys.argv[0] (``__main__.py`` under ``python -m driml_pl``)
        kwargs.setdefault("description", DESCRIPTION)
        return super().init_parser(**kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """``fit --help`` says ``usage: driml_pl fit ...`` and the command's line of the top-level help."""
        super()._add_subcommands(parser, **kwargs)
        for name, subparser in self._subcommand_parsers.items():
            subparser.prog = f"{PROG} {name}"
            subparser.description = f"{PROG} {name}: {COMMANDS[name]}"

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
        self._check_resume()
        self._check_eval_checkpoint()
        self._check_preflight()  # memory and the run directory, before anything is built or written
        self._check_run_lock()  # a run directory another live fit holds is refused here, in one line
        set_torch_threads(self._subconfig_of(self.config).get("torch_threads"))  # before any tensor work

    def _check_preflight(self) -> None:
        """``fit``: the run directory can be written, the Procgen build it asks for is here (`procgen_build`: the
        original's library is fetched once), and what the run will hold (replay, model, optimizer, margin) fits what
        this machine has free, host and GPU (`driml_pl.preflight`); one line and exit 2 if not."""
        if self.config.get("subcommand") != "fit":
            return
        config = self.config["fit"]
        preflight.check_writable("trainer.default_root_dir", _run_root(config))
        preflight.check_compiler(config.as_dict())  # model.compile on the CPU without a C++ compiler: one line
        env = config.data.env
        build = procgen_build.files(env.build)  # the original build's library and assets: fetched once, or one line
        from driml_pl.envs.procgen import load_library

        load_library(str(build.library))  # a system library it links missing (glib, say): one line, now
        warning = procgen_build.mirror_warning(env.build, env.game)
        if warning and _first_process_here():
            print(warning, file=sys.stderr)
        if not _first_process_here():
            return  # a machine's first process checks for all of its ranks; the others may start once it holds memory
        assert self.model_class is not None  # main() always gives the class
        preflight.check_fit(preflight.plan_run(config.as_dict(), self.model_class))

    def _check_run_lock(self) -> None:
        """``fit`` of a run directory another live fit holds: refused before anything is printed or written (the
        lock itself is taken in `_instantiate_trainer`, which refuses the same way if a fit took it in between)."""
        if self.config.get("subcommand") != "fit" or not holds_run_lock():
            return
        refuse_if_locked(Path(_run_root(self.config["fit"])))

    def _check_resume(self) -> None:
        """``fit --ckpt_path``: the checkpoint must load without pickle, be complete and fit the settings; checked
        before anything is printed or written (the world size is checked once the trainer exists). A damaged newest
        unit of a run falls back to the one before it, said in one line (`checkpoint.resume.choose_resumable`)."""
        if self.config.get("subcommand") != "fit":
            return
        config = self.config["fit"]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        path = resume_path(ckpt_path, _run_root(config))
        if path is None:
            return  # `last` without a checkpoint yet: Lightning warns and starts afresh
        data = config.data
        chosen, note = choose_resumable(path, resume_settings(data.env.game, data.env.num_envs, data.replay_size,
                                                              data.frame_stack, None))  # fmt: skip
        if note is not None:
            config.ckpt_path = str(chosen)
            if holds_run_lock():  # global rank 0 (the other ranks of a DDP run make the same choice)
                print(note, file=sys.stderr)

    def _parse_ckpt_path(self) -> None:
        """``fit --ckpt_path``: the checkpoint's model settings, as Lightning takes them, but a setting the config gives
        otherwise is refused in one line, or with ``--fork true`` kept (`driml_pl.checkpoint.fork`)."""
        subcommand = self.config.get("subcommand")
        config: Any = self.config[subcommand] if subcommand else {}
        if subcommand != "fit" or not config.get("ckpt_path"):
            if config.get("fork"):
                raise ValueError("--fork true is not allowed without --ckpt_path: a fork continues a checkpoint")
            super()._parse_ckpt_path()
            return
        root = Path(_run_root(config))
        path = resume_path(config.ckpt_path, root)
        if path is None or not path.is_file():
            if config.get("fork"):
                raise ValueError(f"--fork true is not allowed: --ckpt_path {config.ckpt_path} names no checkpoint file")
            super()._parse_ckpt_path()
            return
        given = config.model.as_dict()
        saved = checkpoint_settings(path)
        overrides = fork_overrides(settings_changes(given, saved), saved, bool(config.get("fork")), path, root)
        super()._parse_ckpt_path()
        for key, value in overrides.items():
            self.config[subcommand].model[key] = value

    def _check_eval_checkpoint(self) -> None:
        """``validate``/``test`` evaluate a checkpoint, never freshly initialised weights: without ``--ckpt_path``
        they evaluate the run directory's own ``checkpoints/last.ckpt`` and say so in one line; with none there,
        they are refused (before anything is written). ``--ckpt_path last`` names the same file."""
        subcommand = self.config.get("subcommand")
        if subcommand not in ("validate", "test"):
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path != "last":
            return
        path = last_checkpoint(_run_root(config))
        if not path.is_file():
            given = "last" if ckpt_path else None
            raise ValueError(
                f"ckpt_path={given} is not allowed: {subcommand} evaluates a checkpoint and {path} does not exist; "
                f"give --ckpt_path PATH, or the run's --trainer.default_root_dir"
            )
        config.ckpt_path = str(path)
        if not ckpt_path:
            note = f"driml_pl: no --ckpt_path given: {subcommand} evaluates the run's checkpoint {path}"
            print(note, file=sys.stderr)

    @staticmethod
    def _subconfig_of(config: Any) -> Any:
        subcommand = config.get("subcommand")
        return config[subcommand] if subcommand else config

    def _known_keys(self, subcommand: str | None) -> list[str]:
        parsers = getattr(self, "_subcommand_parsers", {})
        parser = parsers.get(subcommand) if subcommand else self.parser
        actions = getattr(parser, "_actions", [])
        return [a.dest for a in actions if a.dest not in ("help", "config", "print_config", "==SUPPRESS==")]

    def _check(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        check_config(config)
        project = config.get("wandb_project")
        if project and importlib.util.find_spec("wandb") is None:
            raise ValueError(f"wandb_project={project} is not allowed: wandb is not installed (pip install wandb)")
        timeout = config.get("ddp_timeout")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"ddp_timeout={timeout} is not allowed: a number of seconds > 0")

    def before_instantiate_classes(self) -> None:
        """Check again: a --ckpt_path may have brought the checkpoint's model hyper-parameters in since parsing."""
        self._check()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.frame_stack", "model.frame_stack")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed)
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_seed)
        parser.link_arguments("data.horizon.mode", "model.adaptive_horizon", compute_fn=_is_adaptive)
        parser.link_arguments("data.env.game", "model.game")
        parser.add_class_arguments(CheckpointConfig, "checkpoint")
        parser.add_argument(
            "--wandb_project",
            type=str | None,
            default=None,
            help="also log to Weights & Biases under this project (needs `pip install wandb`)",
        )
        parser.add_argument(
            "--fork",
            type=bool,
            default=False,
            help="with --ckpt_path: continue the checkpoint's state as a new run (another --trainer.default_root_dir) "
            "with changed loss settings (model.lambda_*, ...; docs/running.md, 'Forking a run')",
        )
        parser.add_argument(
            "--ddp_timeout",
            type=float,
            default=600.0,
            help="seconds a DDP rank waits in a collective for the others before the run fails (ddp strategies "
            "given by name; a strategy given as a class keeps its own timeout)",
        )
        parser.add_argument(
            "--torch_threads",
            type=int | None,
            default=None,
            help="torch intra-op threads of this process (each DDP rank); default: OMP_NUM_THREADS if set, else the "
            "cores this process may use // DRIML_RUNS_PER_MACHINE (default 1). See docs/threads.md",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """`validate`/`test` print the project's table (`after_validate`), not Lightning's, unless --verbose true."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("fit", "validate", "test"):
            parser.set_defaults(weights_only=True)  # loading a checkpoint never unpickles code from the file
        if subcommand in ("validate", "test"):
            parser.set_defaults(verbose=False)
        return parser

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Lay the run directory out under ``trainer.default_root_dir`` unless the config sets loggers/checkpoints.

        ``<root>/logs/version_N/`` holds config.yaml, metrics.csv and TensorBoard events (a resume opens a new
        version; nothing is overwritten). ``<root>/checkpoints/`` holds the checkpoint unit (`driml_pl.checkpoint`):
        last.ckpt, written every ``checkpoint.every_n_updates`` updates, on signals and at the end of the budget, plus
        every rank's stream state and replay segments.
        ``<root>/videos/`` holds evaluation videos (MP4; GIF without imageio-ffmpeg), ``<root>/plot.png`` the run's
        plot. The run's progress bar is added unless ``enable_progress_bar`` is false (or another bar is given).
        """
        root = Path(self._expand(str(config.get("default_root_dir") or "runs/driml")))
        config["default_root_dir"] = str(root)
        if self.subcommand == "fit":
            hold_for_fit(root)  # issue 19 hook (driml_pl.runlock): refused before anything is written, exit 2
        if config.get("logger") in (None, True):
            version = _next_version(root / "logs")
            loggers: list[Logger] = [
                CSVLogger(root, name="logs", version=version),
                EnvStepsTensorBoardLogger(root, name="logs", version=version),  # x axis: env steps
            ]
            project = self._subconfig().get("wandb_project")
            if project:
                from pytorch_lightning.loggers import WandbLogger

                loggers.append(WandbLogger(project=project, save_dir=str(root / "logs"), name=root.name))
            config["logger"] = loggers
        given = (config.get("callbacks") or []) + callbacks
        if not any(isinstance(c, ModelCheckpoint) for c in given) and config.get("enable_checkpointing") is not False:
            checkpoint = self.config_init[self.subcommand].get("checkpoint") if self.subcommand else None
            callbacks = [*callbacks, RunCheckpoint(checkpoint_dir(root), checkpoint or CheckpointConfig())]
        if not any(isinstance(c, ProgressBar) for c in given) and config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, DRIMLProgressBar()]
        timeout = float(self._subconfig().get("ddp_timeout") or 600.0)
        config["strategy"] = _with_timeout(config.get("strategy", "auto"), timeout)
        callbacks = [*callbacks, StopRanksOnError()]
        for kind in (EvalVideos, RunPlot):
            if not any(isinstance(c, kind) for c in given):
                callbacks = [*callbacks, kind()]
        return super()._instantiate_trainer(config, callbacks)

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _expand(self, template: str) -> str:
        """``{game}`` and ``{seed}`` in trainer.default_root_dir become the run's game and seed."""
        config = self._subconfig()
        return template.format(game=config.data.env.game, seed=config.seed_everything)

    def before_fit(self) -> None:
        """Check what can fail before anything is written; refuse to start a fresh run on another run's checkpoints."""
        checkpoint = self.trainer.checkpoint_callback
        on_ctrl_c(lambda: getattr(checkpoint, "committed", None))  # issue 19 hook (driml_pl.interrupt)
        self.datamodule.check_budget(self.trainer.world_size)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path:
            path = resume_path(ckpt_path, self.trainer.default_root_dir)
            if path is not None:
                check_resumable(path, self.datamodule.resume_settings(self.trainer.world_size))
            return
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            dirpath = getattr(callback, "dirpath", None)
            if isinstance(callback, ModelCheckpoint) and dirpath and last_checkpoint_in(dirpath).exists():
                raise ValueError(
                    f"{dirpath} already holds last.ckpt from an earlier run; resume it with --ckpt_path last "
                    "or pick another --trainer.default_root_dir"
                )

    def after_validate(self) -> None:
        self._print_eval_table("eval")

    def after_test(self) -> None:
        self._print_eval_table("test")

    def _print_eval_table(self, prefix: str) -> None:
        if self.trainer.is_global_zero:
            from driml_pl.tools.eval_table import eval_table

            config = self._subconfig()
            table = eval_table(self.trainer.callback_metrics, prefix, config.as_dict(), config.get("ckpt_path"))
            Console(width=None if sys.stdout.isatty() else 120).print(table)  # a log file gets the whole table


TRAINER_DEFAULTS = {
    "default_root_dir": "runs/driml",
    "max_epochs": -1,  # the env-step budget (data.total_env_steps) ends the run
    "num_sanity_val_steps": 0,
    "check_val_every_n_epoch": 1,  # Lightning checks at every epoch end; data.eval_every_env_steps decides
    "log_every_n_steps": 50,
}


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_warnings() -> None:
    """Silence what a user cannot act on (listed in the README): Lightning's notice that the replay stream (an
    IterableDataset) has ``__len__`` (it must: its epochs have a length, and it runs in the main process), torch's
    LeafSpec deprecation raised inside Lightning, and Lightning's litlogger advert. (No gym banner: the Procgen
    backend imports neither procgen's Python module nor gym.)"""
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTip())


def main(args: list[str] | None = None, model: type[DRIML] = DRIML) -> None:
    """``python -m driml_pl ...``; ``model`` is the LightningModule class the CLI builds: a subclass of `DRIML` with
    extra ``__init__`` arguments gets them as ``model.*`` config keys (docs/architecture.md)."""
    argv = sys.argv[1:] if args is None else args
    dispatch(argv)  # help, --version, plot/report/grid, a bad command: answered (and exited) there
    quiet_warnings()
    from driml_pl.bundled import resolve_config_args

    resolved = resolve_config_args(argv)  # `--config conf/x.yaml` from a regular install: the bundled copy
    if resolved != list(argv):
        if args is None:  # LightningCLI warns when it is given both args and a command line: rewrite sys.argv
            sys.argv[1:] = resolved
        else:
            args = resolved
    try:  # a full disk (exit 28), Ctrl-C (exit 130) and the run directory's lock (driml_pl.lifecycle)
        cli = DRIMLCLI(
            model,
            DRIMLDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            args=args,
            auto_configure_optimizers=False,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"driml_pl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except MisconfigurationException as err:  # Lightning's own refusal of a setting the checks above let through
        print(f"driml_pl: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:  # a NaN/Inf loss during training: exit code 3
        print(f"driml_pl: error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except (DiskFullError, Interrupted) as err:
        raise SystemExit(stopped(err)) from None
    except KeyboardInterrupt:  # Ctrl-C while the config is read and checked (a first run's Procgen fetch, say)
        print("driml_pl: Ctrl-C before the run started: stopped, nothing written", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as err:  # a full disk outside a checkpoint unit (the logs): one line too
        if not is_disk_full(err):
            raise
        raise SystemExit(stopped(err)) from None
    finally:
        release_fit_lock()
        restore_ctrl_c()
    callbacks = getattr(cli.trainer, "callbacks", [])
    late = next((c.signal_at_end for c in callbacks if getattr(c, "signal_at_end", None)), None)
    if late:
        print(f"driml_pl: {late} came with the budget's last update: the run finished", file=sys.stderr)
    if any(getattr(c, "interrupted", False) for c in callbacks):
        raise SystemExit(stopped(cli.trainer.checkpoint_callback))
    if any(getattr(c, "terminated", False) for c in callbacks):
        print("driml_pl: stopped by SIGTERM after writing a checkpoint; resume with --ckpt_path last", file=sys.stderr)
        raise SystemExit(143)


if __name__ == "__main__":
    main()
