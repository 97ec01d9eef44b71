"""Test-only fault injection, applied through named seams of the production code (which reads no test variable).

As a library, in-process (`install`, usually through pytest's ``monkeypatch``); as a launcher, for subprocess
tests::

    python tests/support/faults.py --nan-at 30 -- fit --config conf/quickstart.yaml ...

The launcher installs the faults, then runs ``driml_pl.cli.main`` with the arguments after ``--``. Lightning's DDP
launcher re-runs ``sys.argv`` for the other ranks, so they run this script with the same faults.

Faults and their seams:

* ``nan_at=N``: update N's C51 loss (and so the total) becomes NaN, so that update writes NaN weights. Seam:
  `driml_pl.learner.objective.driml_losses`, which both update runners call (op by op and captured).
* ``fail_at=N, fail_rank=R, fail_mode=raise|exit|hang``: rank R fails in update N: a RuntimeError, a hard death
  (``os._exit(1)``, no clean-up) or a rank that stops responding. Same seam. Updates count from 1.
* ``signal_at=N, signal_name=SIGTERM``: the process signals itself during update N (as a scheduler's SIGTERM or a
  Ctrl-C arriving then); the checkpoint callback acts on it at the end of that step. Same seam.
* ``slow=S``: every Lightning step takes S seconds more (a run slow enough to signal mid-way). Seam:
  `RunCheckpoint.on_train_batch_end`.
* ``crash_at=mid_flush|before_commit|after_commit, crash_after=U``: SIGKILL in the U-th checkpoint unit this process
  writes: half-way through its first file (seam: `driml_pl.checkpoint.format.write_npy`), right before the commit's
  rename (seam: `driml_pl.checkpoint.format.commit_file`), or right after the commit, before pruning (seam:
  `RunCheckpoint.prune`). ``crash_signal=SIGINT`` sends a Ctrl-C there instead of the SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

Patch = Callable[[Any, str, Any], None]  # (owner, attribute name, new value): monkeypatch.setattr, or plain setattr


@dataclass
class Faults:
    nan_at: int | None = None
    fail_at: int | None = None
    fail_rank: int = 1
    fail_mode: str = "raise"
    slow: float = 0.0
    crash_at: str | None = None
    crash_after: int = 1
    crash_signal: str = "SIGKILL"  # what the crash sends (SIGINT: a Ctrl-C at that moment)
    signal_at: int | None = None
    signal_name: str = "SIGTERM"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def install(faults: Faults, patch: Patch = setattr) -> None:
    """Wrap the seams named in the module docstring with ``faults``."""
    from driml_pl.checkpoint.callback import RunCheckpoint
    from driml_pl.learner import objective

    if faults.nan_at is not None or faults.fail_at is not None or faults.signal_at is not None:
        losses = objective.driml_losses

        def driml_losses(nets: Any, inputs: Any, core: Any = None) -> dict[str, torch.Tensor]:
            out = losses(nets, inputs, core)
            update = int(nets.global_step) + 1  # inside Lightning's optimizer step, global_step counts the others
            if update == faults.fail_at and _rank() == faults.fail_rank:
                if faults.fail_mode == "exit":
                    os._exit(1)
                while faults.fail_mode == "hang":
                    time.sleep(1)
                raise RuntimeError(f"injected failure of rank {faults.fail_rank} in update {update}")
            if update == faults.signal_at:
                os.kill(os.getpid(), getattr(signal, faults.signal_name))
            if update == faults.nan_at:
                out = dict(out)
                out["c51_loss"] = out["c51_loss"] * float("nan")
                out["loss"] = out["loss"] * float("nan")
            return out

        patch(objective, "driml_losses", driml_losses)

    if faults.slow > 0:
        batch_end = RunCheckpoint.on_train_batch_end

        def slow_batch_end(self: RunCheckpoint, *args: Any) -> None:
            time.sleep(faults.slow)
            batch_end(self, *args)

        patch(RunCheckpoint, "on_train_batch_end", slow_batch_end)

    if faults.crash_at is not None:
        _install_crash(faults.crash_at, faults.crash_after, getattr(signal, faults.crash_signal), patch)


def _install_crash(moment: str, after: int, sig: int, patch: Patch) -> None:
    from driml_pl.checkpoint import format
    from driml_pl.checkpoint.callback import RunCheckpoint

    units = [0]  # checkpoint units this process started
    write_unit = RunCheckpoint.write_unit

    def counted_write_unit(self: RunCheckpoint, trainer: Any) -> None:
        units[0] += 1
        write_unit(self, trainer)

    patch(RunCheckpoint, "write_unit", counted_write_unit)

    def kill() -> None:
        os.kill(os.getpid(), sig)
        time.sleep(1)  # a Python handler (SIGINT) runs here; the write then goes on, unless the handler raised

    if moment == "mid_flush":
        write_npy = format.write_npy

        def half_then_kill(path: Path, array: np.ndarray | torch.Tensor) -> int:
            if units[0] != after:
                return write_npy(path, array)
            data = (array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)).tobytes()
            with path.open("wb") as f:  # half of the file's bytes are on disk when the signal comes
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            kill()
            return write_npy(path, array)

        patch(format, "write_npy", half_then_kill)
    elif moment == "before_commit":
        commit_file = format.commit_file

        def kill_then_commit(tmp: Path, final: Path) -> None:
            if units[0] == after:
                kill()
            commit_file(tmp, final)

        patch(format, "commit_file", kill_then_commit)
    elif moment == "after_commit":
        prune = RunCheckpoint.prune

        def kill_then_prune(self: RunCheckpoint, unit: str) -> None:
            if units[0] == after:
                kill()
            prune(self, unit)

        patch(RunCheckpoint, "prune", kill_then_prune)
    else:
        raise ValueError(f"crash_at={moment!r}: mid_flush, before_commit or after_commit")


def launcher_args(faults: Faults) -> list[str]:
    """The launcher's options for ``faults`` (what `command` puts before ``--``)."""
    args: list[str] = []
    for key, value in vars(faults).items():
        if value is not None and value != getattr(Faults(), key):
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def command(faults: Faults, driml_args: Sequence[str]) -> list[str]:
    """The subprocess command that runs ``python -m driml_pl <driml_args>`` with ``faults`` installed."""
    return [sys.executable, str(Path(__file__).resolve()), *launcher_args(faults), "--", *driml_args]


def python_with_faults(directory: Path, faults: Faults) -> Path:
    """An executable that stands in for the interpreter where commands are built as ``PYTHON -m driml_pl fit ...``
    (the grid's ``--python``): a fit runs with ``faults`` installed, anything else (``grid task``, ``report``) as is."""
    script = directory / "python-with-faults"
    launcher = " ".join([sys.executable, str(Path(__file__).resolve()), *launcher_args(faults)])
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "driml_pl" ] && [ "$3" = "fit" ]; then\n'
        f'  shift 2\n  exec {launcher} -- "$@"\nfi\n'
        f'exec {sys.executable} "$@"\n'
    )
    script.chmod(0o755)
    return script


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="faults.py")
    for key, value in vars(Faults()).items():
        kind = type(value) if value is not None else (str if key == "crash_at" else int)
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, default=value)
    faults = Faults(**vars(parser.parse_args(argv[:cut])))
    install(faults)
    from driml_pl.cli import main as driml_main

    driml_main(argv[cut + 1 :])


if __name__ == "__main__":
    main()
