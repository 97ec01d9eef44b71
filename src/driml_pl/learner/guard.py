"""The finite-loss guard: a NaN or Inf loss stops the run before any checkpoint holds the weights it produced.

The first update whose loss terms are not all finite is recorded on the device (`DeviceMetrics.fault`, no sync). It
is read back on logging steps (every step on the CPU, where a read costs nothing), before a checkpoint unit is
written (`RunCheckpoint.write_unit` calls `DRIML.check_finite` first, on every rank) and at the end of training;
`NonFiniteLossError` then ends the run with exit code 3 and one line naming the update, its first non-finite term and
the last good checkpoint.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback

from driml_pl.learner.metrics import NO_FAULT, DeviceMetrics


class NonFiniteLossError(FloatingPointError):
    """A loss term was NaN or Inf; raised before any checkpoint holds the weights that update produced (exit code 3)."""


def first_fault(metrics: DeviceMetrics, device: torch.device, all_ranks: bool) -> int:
    """The fault code of the first non-finite update (`NO_FAULT` if none); with ``all_ranks`` the earliest over every
    DDP rank (a collective: every rank must call it). One device -> host read."""
    metrics.flush()
    fault = metrics.fault
    if fault is None:
        fault = torch.full((), NO_FAULT, dtype=torch.int64, device=device)
    if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        fault = fault.clone()
        torch.distributed.all_reduce(fault, op=torch.distributed.ReduceOp.MIN)
    return int(fault)


def check_finite(
    metrics: DeviceMetrics, trainer: pl.Trainer, device: torch.device, last_good_step: int | None, all_ranks: bool
) -> None:
    """Raise `NonFiniteLossError` if a loss term of any update so far was NaN or Inf.

    The message names the first such update (counted from 1: update N leaves ``global_step == N``), its first
    non-finite term (the weighted sum ``loss`` only when no single term is) and the last good checkpoint.
    """
    code = first_fault(metrics, device, all_ranks and trainer.world_size > 1)
    if code == NO_FAULT:
        return
    update, what = metrics.describe(code)
    callback = getattr(trainer, "checkpoint_callback", None)
    path = getattr(callback, "last_model_path", "") or trainer.ckpt_path
    if path and last_good_step is not None:
        last = f"the last good checkpoint is {path} (update {last_good_step}), left as it was"
    else:
        last = "no checkpoint of this run was written"
    raise NonFiniteLossError(f"non-finite loss at update {update}: {what}; the run stops here and {last}")


class FiniteLossGuard(Callback):
    """Checks the losses (every rank's) when Lightning saves a checkpoint and at the end of training.

    `RunCheckpoint` checks before it writes anything of a unit; this is the second line of defence, for a save that
    does not go through it (``trainer.save_checkpoint`` called by other code). Lightning 2.6's ``dump_checkpoint``
    calls every callback's ``state_dict`` before it opens a file, so the check runs there.
    """

    def __init__(self, module: Any) -> None:
        self.module = module  # a `DRIML` (typed loosely: the module imports this file)

    def state_dict(self) -> dict[str, Any]:
        self.module.check_finite(all_ranks=True)
        return {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module.check_finite(all_ranks=True)
