"""Ctrl-C (SIGINT) as the checkpoint's third signal, next to SIGTERM and SIGUSR1 (`driml_pl.checkpoint.RunCheckpoint`).

- The first Ctrl-C during training is recorded like SIGTERM: at the next step boundary the checkpoint unit is written
  and committed, the run stops, and the CLI exits with code 130 and one line naming the checkpoint.
- A second Ctrl-C (or any Ctrl-C outside training: while the envs start, the replay is restored, the plot is drawn)
  raises `Interrupted` at once. Whatever unit was being written is discarded; ``last.ckpt`` stays the previous unit.
  The CLI exits with 130 and one line naming that unit.

`Interrupted` is a BaseException but not a KeyboardInterrupt, so Lightning's own Ctrl-C path ("Detected
KeyboardInterrupt, attempting graceful shutdown", exit 1) never runs: Lightning re-raises it after its exception hooks.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch

EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C

# the order in which ranks settle on one signal when they received different ones (DDP): the strongest wins
_PRIORITY: dict[int, int] = {int(signal.SIGUSR1): 1, int(signal.SIGINT): 2, int(signal.SIGTERM): 3}


class Interrupted(BaseException):
    """Ctrl-C that stops the run at once (a second one, or one outside training); its argument is the last committed
    checkpoint (``<path> (update N)``) or None."""


def on_ctrl_c(last_good: Callable[[], str | None]) -> None:
    """From now on (the CLI's ``before_fit``: env and replay setup, a resume's read, and after training) Ctrl-C stops
    at once, without Lightning's KeyboardInterrupt path; `RunCheckpoint` replaces the handler during training."""

    global _PREVIOUS

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(last_good())

    with contextlib.suppress(ValueError):  # not the main thread: nothing to install
        previous = signal.signal(signal.SIGINT, handler)
        if _PREVIOUS is None:
            _PREVIOUS = previous


def restore_ctrl_c() -> None:
    """Give SIGINT back the handler it had before `on_ctrl_c` (the CLI's ``main`` on the way out: a Python session or
    a test that called it gets its KeyboardInterrupt back)."""
    global _PREVIOUS
    if _PREVIOUS is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, _PREVIOUS)
        _PREVIOUS = None


_PREVIOUS: Any = None  # SIGINT's handler before the fit's


def announce(step: int, committed: str | None) -> None:
    """The first Ctrl-C's notice, printed when its checkpoint starts (a big replay takes a while to write)."""
    again = f"keeps {committed}" if committed else "leaves no checkpoint (none was written yet)"
    print(
        f"driml_pl: Ctrl-C: writing the checkpoint of update {step:,}, then stopping (Ctrl-C again stops at once and "
        f"{again})",
        file=sys.stderr,
        flush=True,
    )


def agree(trainer: Any, sig: int | None) -> int | None:
    """Under DDP every rank must write the same unit at the same step: the ranks settle on the strongest signal any
    of them received (one all-reduce of one integer per step; a no-op on one process)."""
    world = getattr(trainer, "world_size", 1)
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sig
    code = torch.tensor([_PRIORITY.get(sig, 0) if sig is not None else 0], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    level = int(code.item())
    return next((s for s, p in _PRIORITY.items() if p == level), None)
