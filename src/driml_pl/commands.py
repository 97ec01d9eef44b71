"""`driml_pl` / `python -m driml_pl`: the commands, the top-level help and ``--version``.

Only the standard library is imported here, so ``--help``, ``--version`` and a bad command answer without loading
torch or Lightning (`driml_pl.__main__` calls `dispatch` before it imports `driml_pl.cli`). ``fit``, ``validate`` and
``test`` go on to the LightningCLI in `driml_pl.cli`; ``plot``, ``report`` and ``grid`` to their modules in
`driml_pl.tools`.

No command at all is a usage error: the help goes to stderr and the exit code is 2, as for an unknown command or an
option before the command (one line, ``driml_pl: error: ...``). ``-h``/``--help`` prints the help to stdout and
``--version`` the version, both with exit code 0. Lightning's ``predict`` is not a command: DRIML has no ``forward``
to predict with (its outputs are actions, made by the actor, and evaluations, made by ``validate``/``test``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

PROG = "driml_pl"
DESCRIPTION = "DRIML (C51 + InfoNCE, Mazoure et al. 2020) on Procgen: a PyTorch Lightning trainer."

# every command the README's "Subcommands" table lists, with its one line in the help (which fits 80 columns)
COMMANDS = {
    "fit": "train from a config (--config FILE) or resume (--ckpt_path last)",
    "validate": "evaluate a checkpoint on the training episodes, print a table",
    "test": "evaluate a checkpoint on other episodes (other seeds)",
    "plot": "a run's PNG: returns, evaluations and losses against env steps",
    "report": "tables and figures of runs beside the paper's (IQM, intervals)",
    "grid": "the paper's grid (methods x games x seeds) on SLURM or submitit",
}
TRAINER_COMMANDS = ("fit", "validate", "test")  # LightningCLI's subcommands (driml_pl.cli.DRIMLCLI)
TOOLS = {"plot": "driml_pl.tools.plots", "report": "driml_pl.tools.report", "grid": "driml_pl.tools.launch"}
GONE = {
    "predict": "predict is not a command of driml_pl: the agent has no forward to predict with; its evaluation is "
    "validate or test (driml_pl validate --ckpt_path P)"
}


def version() -> str:
    """The installed distribution's version; from a checkout that is not installed, the package's ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("driml-pl")
    except PackageNotFoundError:
        from driml_pl import __version__

        return __version__


def help_text() -> str:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {line}" for name, line in COMMANDS.items())
    return f"""usage: {PROG} COMMAND [ARGS ...]
       {PROG} -h | --help | --version

{DESCRIPTION}

commands:
{commands}

options:
  -h, --help  print this help and exit
  --version   print the version and exit

A command's own help: {PROG} COMMAND --help (e.g. {PROG} fit --help).
"""


def _usage_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def dispatch(argv: Sequence[str]) -> None:
    """Answer everything but the trainer's commands: ``--help``, ``--version``, no command or a bad one (exit 2), and
    ``plot``/``report``/``grid`` (run, then exit with their code). Returns for ``fit``, ``validate`` and ``test``."""
    first = str(argv[0]) if argv else None
    if first in TRAINER_COMMANDS:
        return
    if first in TOOLS:
        tool = importlib.import_module(TOOLS[first])
        raise SystemExit(tool.main([str(a) for a in argv[1:]]))
    if first in ("-h", "--help"):
        print(help_text(), end="")
        raise SystemExit(0)
    if first == "--version":
        print(f"{PROG} {version()}")
        raise SystemExit(0)
    allowed = ", ".join(COMMANDS)
    if first is None:
        print(help_text(), file=sys.stderr, end="")
        _usage_error(f"a command is required: one of {allowed}")
    assert first is not None
    if first in GONE:
        _usage_error(GONE[first])
    if first.startswith("-"):
        _usage_error(f"{first}: the command comes first, e.g. {PROG} fit --config FILE (commands: {allowed})")
    _usage_error(f"unknown command {first!r}: the commands are {allowed} ({PROG} --help)")
