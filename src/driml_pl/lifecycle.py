"""How a ``fit`` ends, as the shell sees it: the exit codes, and the one line each stop prints (docs/lifecycle.md).

=====  ==========================================================================================================
code   meaning
=====  ==========================================================================================================
0      the run finished (or stopped at ``trainer.max_epochs``/``max_steps``) and its last checkpoint is committed
1      an unexpected error (a Python traceback)
2      bad input, nothing written: a config value, a checkpoint that cannot be resumed, a run directory in use
3      a non-finite loss: the run stopped, the last good checkpoint is left as it was
28     no space left on the checkpoint's filesystem: partial files removed, the last good checkpoint left as it was
130    Ctrl-C: the first one writes a checkpoint at the next step boundary; a second one stops at once
143    SIGTERM: a checkpoint was written at the next step boundary (a signal with the budget's last update: 0)
=====  ==========================================================================================================
"""

from __future__ import annotations

import sys
from typing import Any

from driml_pl import interrupt
from driml_pl.checkpoint import diskfull
from driml_pl.checkpoint.diskfull import DiskFullError
from driml_pl.interrupt import Interrupted

EXIT_CODES = {
    "finished": 0,
    "error": 1,
    "bad input": 2,
    "non-finite loss": 3,
    "disk full": diskfull.EXIT_CODE,
    "ctrl-c": interrupt.EXIT_CODE,
    "sigterm": 143,
}


def stopped(why: Any) -> int:
    """Print the one line for a run that stopped early and return its exit code.

    Args:
        why: a `DiskFullError` (or an ENOSPC `OSError` outside a unit), an `Interrupted` (a second Ctrl-C, or one
            outside training), or the run's `RunCheckpoint` after the first Ctrl-C's checkpoint was committed.
    """
    if isinstance(why, DiskFullError):
        print(f"driml_pl: error: {why}", file=sys.stderr, flush=True)
        return diskfull.EXIT_CODE
    if isinstance(why, OSError):  # ENOSPC outside a checkpoint unit: the logs, a video, the plot
        where = f" writing {why.filename}" if why.filename else ""
        print(
            f"driml_pl: error: no space left on device{where}: the run stopped; free space, then resume with "
            "--ckpt_path last (the last committed checkpoint is left as it was)",
            file=sys.stderr,
            flush=True,
        )
        return diskfull.EXIT_CODE
    if isinstance(why, Interrupted):
        last = why.args[0] if why.args else None
        kept = f"the last checkpoint is {last}, left as it was" if last else "no checkpoint of this run was written"
        print(f"driml_pl: stopped at once by Ctrl-C; {kept}", file=sys.stderr, flush=True)
        return interrupt.EXIT_CODE
    committed = getattr(why, "committed", None)
    where = f"wrote the checkpoint {committed}" if committed else "no checkpoint was written"
    print(f"driml_pl: stopped by Ctrl-C: {where}; resume with --ckpt_path last", file=sys.stderr, flush=True)
    return interrupt.EXIT_CODE
