"""When the checkpoint unit is written, and by whom: `RunCheckpoint`, a Lightning callback.

A unit is written every ``checkpoint.every_n_updates`` updates, every ``checkpoint.every_minutes``, on SIGTERM
(then exit 143), SIGINT (Ctrl-C: then exit 130; a second Ctrl-C stops at once) and SIGUSR1 (the run goes on),
after an exception outside a training step, and at the end of the budget. A failed write leaves no partial files,
and a full disk ends the run in one line (exit 28, `driml_pl.checkpoint.diskfull`).

Writing one (`RunCheckpoint.write_unit`, on every rank): the finite-loss check, this rank's half
(`StreamCheckpointer`: the replay's new slots and the stream state), a barrier, ``last.ckpt.tmp`` (rank 0 writes;
it carries the unit pointer, `UNIT_KEY`); the commit (`commit_unit`) renames it over ``last.ckpt`` at the start of
the next step, once that step's metrics are on disk, and only then are older units pruned. On resume the callback
reads this rank's half back into the stream (`on_load_checkpoint`).
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from driml_pl.checkpoint import format
from driml_pl.checkpoint.diskfull import DiskFullError, UnitGuard, unit_bytes
from driml_pl.checkpoint.format import CheckpointError, StreamCheckpointer
from driml_pl.checkpoint.resume import (
    UNIT_KEY,
    checkpoint_dir,
    last_checkpoint_in,
    previous_checkpoint_in,
    unit_pointer,
)
from driml_pl.data import DRIMLDataModule, ReplayStream
from driml_pl.interrupt import Interrupted, agree, announce
from driml_pl.types import FiniteGuarded


@dataclass
class CheckpointConfig:
    """When the run's checkpoint unit is written (besides the end of the budget).

    Args:
        every_n_updates: every time the update count crosses a multiple of this (0: off).
        every_minutes: also every this many minutes of wall time (0: off).
        save_replay: write the replay (incrementally). Off: small checkpoints, and a resume refills the replay with
            ``data.learning_starts`` env steps of the restored policy first (approximate; a warning says so).
        on_signal: on SIGTERM (checkpoint, then stop with exit code 143) and SIGUSR1 (checkpoint, go on), e.g.
            pre-emption notices.
        on_exception: when the run dies of an exception outside a training step (an exception inside a step, or a
            non-finite loss, leaves the last good checkpoint as it is).
        keep_previous: keep the unit before the newest as well (``previous.ckpt``, its stream state and the replay
            segments it references), so that a resume of a damaged newest unit falls back to it. Costs a second
            weights file and, where units are further apart than the replay holds, a second replay on disk.
    """

    every_n_updates: int = 10_000
    every_minutes: float = 0.0
    save_replay: bool = True
    on_signal: bool = True
    on_exception: bool = True
    keep_previous: bool = True

    def __post_init__(self) -> None:
        if self.every_n_updates < 0:
            raise ValueError(f"checkpoint.every_n_updates={self.every_n_updates} is not allowed: must be >= 0")
        if self.every_minutes < 0:
            raise ValueError(f"checkpoint.every_minutes={self.every_minutes} is not allowed: must be >= 0")


class RunCheckpoint(ModelCheckpoint):
    """Writes the checkpoint unit on the configured cadence, on signals, on exceptions and at the end of the budget.

    It is a `ModelCheckpoint` so that Lightning's ``--ckpt_path last`` finds ``<dirpath>/last.ckpt``; Lightning's own
    saving logic is not used.
    """

    def __init__(self, dirpath: str | Path, config: CheckpointConfig | None = None) -> None:
        super().__init__(dirpath=dirpath, save_last=False, save_top_k=0, every_n_epochs=0)
        self.config = config or CheckpointConfig()
        self._last_time = time.monotonic()
        self._last_updates = 0
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._in_step = False
        self._sequence = 0
        self._pending_unit: str | None = None  # written, not yet committed
        self.terminated = False  # set after a SIGTERM checkpoint: the CLI exits with 143
        self.interrupted = False  # set after the first Ctrl-C's checkpoint is due: the CLI exits with 130
        self.signal_at_end: str | None = None  # a signal that came with the budget's last update (exit 0)
        self.committed: str | None = None  # the last committed unit: "<dir>/last.ckpt (update N)", for messages
        self._guard: UnitGuard | None = (
            None  # the written, not yet committed unit's guard (`driml_pl.checkpoint.diskfull`)
        )
        self._half: StreamCheckpointer | None = None  # this rank's half of the unit
        self._unit: str | None = None  # the unit this run last wrote or resumed from
        self._committed_unit: str | None = None  # the unit of the file below, which the next commit keeps
        self._committed_file: Path | None = None  # last.ckpt, or previous.ckpt after a fallback resume

    # signals -------------------------------------------------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and (self.interrupted or self._signal == signal.SIGINT):
            raise Interrupted(self.committed)  # a second Ctrl-C stops at once (the unit being written is discarded)
        self._signal = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time = time.monotonic()
        self._last_updates = trainer.global_step
        if trainer.ckpt_path and trainer.global_step > 0:  # resumed: that unit is the last good one
            self.committed = f"{trainer.ckpt_path} (update {trainer.global_step:,})"
        if self.config.on_signal:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                with contextlib.suppress(ValueError):  # not the main thread: no handlers
                    self._previous_handlers[sig] = signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    # cadence -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.commit_unit(trainer)  # the unit written at the end of the previous step, now that its logs are out
        self._in_step = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._in_step = False
        cfg, updates = self.config, trainer.global_step
        due = cfg.every_n_updates > 0 and updates // cfg.every_n_updates > self._last_updates // cfg.every_n_updates
        due |= cfg.every_minutes > 0 and time.monotonic() - self._last_time >= 60 * cfg.every_minutes
        sig, self._signal = agree(trainer, self._signal), None  # one signal for all ranks
        stream = _stream(trainer)
        if sig is not None and stream is not None and stream.exhausted:
            self.signal_at_end = signal.Signals(sig).name  # it came with the last update: the run finished, and
            sig = None  # on_train_end writes the budget's last unit as usual
        if sig == signal.SIGTERM:
            self.terminated = True
            trainer.should_stop = True
        if sig == signal.SIGINT:  # Ctrl-C is SIGTERM's checkpoint, then exit 130
            self.interrupted = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                announce(updates, self.committed)
        if sig is not None or (due and not trainer.should_stop):  # at the budget's end, on_train_end writes it
            self.write_unit(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.commit_unit(trainer)
        if trainer.global_step > 0 and self._last_updates != trainer.global_step:
            self.write_unit(trainer)  # the end of the budget (or of max_steps)
            self.commit_unit(trainer)
        self._restore_handlers()  # after the last unit, so that a Ctrl-C while it is written is handled

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, Interrupted | DiskFullError):  # stop now, write nothing more
            if self._guard is not None:
                self._guard.discard()  # a written, uncommitted unit goes too: last.ckpt stays the previous one
            self._guard = self._pending_unit = None
            return
        try:
            self.commit_unit(trainer)  # a unit written before the failure is complete
            if not self.config.on_exception or self._in_step or trainer.global_step == self._last_updates:
                return  # inside a step the state is half-updated: the last good checkpoint stays
            if isinstance(pl_module, FiniteGuarded) and pl_module.nonfinite_update() is not None:
                return
            self.write_unit(trainer)
            self.commit_unit(trainer)
        except Exception as err:  # the original exception matters more
            rank_zero_warn(f"could not write a checkpoint after the exception: {err}")

    # the unit ------------------------------------------------------------------------------------------
    def _directory(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else checkpoint_dir(trainer.default_root_dir)

    def write_unit(self, trainer: pl.Trainer) -> None:
        """Write every rank's half and ``last.ckpt.tmp`` for the state after this step (called on every rank).
        The commit follows at the start of the next step (or at the end of the run), once this step's metrics
        have reached the loggers, so that a resumed run's logs have no gap."""
        module = trainer.lightning_module
        if isinstance(module, FiniteGuarded):
            module.check_finite(all_ranks=True)  # NaN weights are never checkpointed: nothing of the unit is written
        directory = self._directory(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        unit = f"u{trainer.global_step:012d}-{self._sequence:04d}-{int(time.time())}"
        stream = _stream(trainer)
        guard = UnitGuard(directory, unit, trainer.global_rank, self.committed, unit_bytes(trainer))
        with guard:  # a failed write leaves no partial files; a full disk ends the run in one line
            if stream is not None:  # this rank's half: its stream state and the replay slots added since the last
                self._rank_half(trainer, directory).write(stream, unit, trainer.global_step, _settings(trainer))
                self._unit = unit
            trainer.strategy.barrier("driml_pl.checkpoint.halves")
            trainer.save_checkpoint(directory / "last.ckpt.tmp", weights_only=False)  # every rank dumps; rank 0 writes
        self._pending_unit, self._guard = unit, guard
        self._last_time = time.monotonic()
        self._last_updates = trainer.global_step

    def commit_unit(self, trainer: pl.Trainer) -> None:
        """Make the written unit the one ``--ckpt_path last`` resumes (rank 0 renames), then prune older ones."""
        unit, self._pending_unit = self._pending_unit, None
        if unit is None:
            return
        directory = self._directory(trainer)
        tmp = directory / "last.ckpt.tmp"
        guard, self._guard = self._guard, None
        with guard or contextlib.nullcontext():  # a full disk here discards the unit (it is not committed)
            for logger in trainer.loggers:
                logger.save()  # every metric logged up to this step is on disk before the commit
            if trainer.is_global_zero:
                format.flush_file(tmp)
                self._keep_previous(directory, unit, tmp)
        if trainer.is_global_zero:
            format.commit_file(tmp, last_checkpoint_in(directory))
        trainer.strategy.barrier("driml_pl.checkpoint.commit")
        self.prune(unit)
        self._committed_unit, self._committed_file = unit, last_checkpoint_in(directory)
        self.last_model_path = str(last_checkpoint_in(directory))
        self.committed = f"{self.last_model_path} (update {int(unit[1:13]):,})"  # for the one-line messages

    def _keep_previous(self, directory: Path, unit: str, tmp: Path) -> None:
        """Rank 0, before the commit: record the new file's CRC in its unit, and keep the committed unit as
        ``previous.ckpt``. After a fallback resume ``previous.ckpt`` already holds the unit this run continued from
        (``last.ckpt`` is the damaged one): it stays."""
        half = directory / "units" / unit / "rank0"
        if half.is_dir():
            format.write_commit_crc(tmp, half)
        last = last_checkpoint_in(directory)
        if self.config.keep_previous and self._committed_file == last and last.is_file():
            format.keep_as_previous(last, previous_checkpoint_in(directory))

    def prune(self, unit: str) -> None:
        """Delete this rank's units other than the committed ``unit`` (and, with ``keep_previous``, the unit it
        continued from) and the segments they no longer reference."""
        if self._half is not None:
            keep = {unit, self._committed_unit} if self.config.keep_previous else {unit}
            self._half.prune({u for u in keep if u})

    # this rank's half -----------------------------------------------------------------------------------
    def _rank_half(self, trainer: pl.Trainer, directory: Path) -> StreamCheckpointer:
        if self._half is None or self._half.directory != directory:
            self._half = StreamCheckpointer(directory, trainer.global_rank, self.config.save_replay)
        return self._half

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """The unit pointer in ``last.ckpt``: which per-rank halves this checkpoint commits."""
        stream = _stream(trainer)
        if stream is not None:
            # checksum: the unit records this file's size and CRC32 at the commit (`format.write_commit_crc`)
            checkpoint[UNIT_KEY] = {"world_size": trainer.world_size, "global_step": trainer.global_step,
                                    "updates": stream.updates, "unit": self._unit, "checksum": True}  # fmt: skip

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """On ``fit --ckpt_path``: read this rank's half of the unit into the stream (built by the data module's
        setup; Lightning restores callbacks after it and before the train loader is made). `validate`/`test`
        read only the weights."""
        stream = _stream(trainer)
        if stream is None or trainer.state.fn != TrainerFn.FITTING:
            return
        pointer = unit_pointer(checkpoint)
        world = trainer.world_size
        if pointer.get("world_size") != world:
            raise CheckpointError(
                f"trainer.devices x num_nodes={world} does not fit the checkpoint, written with "
                f"{pointer.get('world_size')} ranks"
            )
        if not pointer.get("unit"):
            raise CheckpointError("the checkpoint has no stream state (written by an older driml_pl); start afresh")
        directory = Path(trainer.ckpt_path).parent if trainer.ckpt_path else self._directory(trainer)
        self._rank_half(trainer, directory).read(stream, pointer["unit"], pointer["global_step"], _settings(trainer))
        self._unit = self._committed_unit = pointer["unit"]
        self._committed_file = Path(trainer.ckpt_path) if trainer.ckpt_path else last_checkpoint_in(directory)


def _stream(trainer: pl.Trainer) -> ReplayStream | None:
    """This rank's replay stream during ``fit`` (None before the data module's setup built it)."""
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.stream if isinstance(datamodule, DRIMLDataModule) else None


def _settings(trainer: pl.Trainer) -> dict[str, Any]:
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    assert isinstance(datamodule, DRIMLDataModule)
    return datamodule.resume_settings(trainer.world_size)
