"""The first screen a newcomer reads (issue 26.5): ``python -m driml_pl`` with ``--help``, ``--version``, no command,
``predict`` and a misspelt command, as real subprocesses; the help lists exactly the README's commands and answers
without importing torch or Lightning."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from driml_pl.commands import COMMANDS

COMMAND_NAMES = ", ".join(COMMANDS)


def driml(*args: str, python: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(python or [sys.executable, "-m", "driml_pl"]), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def readme_commands() -> list[str]:
    """The first word of each row of the README's "Subcommands" table (``validate ... / test ...`` names two)."""
    section = ROOT.joinpath("README.md").read_text().split("## Subcommands", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`(\w+)[ `]", row.split("|")[1])]


def test_the_help_names_the_program_says_what_it_is_and_lists_every_readme_command_once():
    shown = driml("--help")
    assert shown.returncode == 0 and shown.stderr == ""
    lines = shown.stdout.splitlines()
    assert lines[0] == "usage: driml_pl COMMAND [ARGS ...]"
    assert "DRIML (C51 + InfoNCE, Mazoure et al. 2020) on Procgen: a PyTorch Lightning trainer." in lines
    listed = lines[lines.index("commands:") + 1 : lines.index("options:") - 1]
    names = [line.split()[0] for line in listed]
    assert names == readme_commands() == ["fit", "validate", "test", "plot", "report", "grid"]
    assert all(len(line) <= 80 and len(line.split()) > 3 for line in listed)  # one line each, with words
    assert "predict" not in shown.stdout and "Lightning Trainer command line tool" not in shown.stdout
    assert driml("-h").stdout == shown.stdout


def test_the_help_and_the_version_answer_without_importing_torch_or_lightning():
    shown = driml(python=[sys.executable, "-X", "importtime", "-m", "driml_pl", "--version"])
    assert shown.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines() if "|" in line}
    assert "driml_pl.commands" in imported
    assert not {"torch", "pytorch_lightning", "numpy"} & imported


def test_version_prints_the_installed_distributions_version_which_is_pyprojects():
    [declared] = re.findall(r'(?m)^version = "([^"]+)"$', ROOT.joinpath("pyproject.toml").read_text())
    shown = driml("--version")
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, f"driml_pl {declared}\n", "")
    script = Path(sys.executable).parent / "driml_pl"  # the console script the install made
    assert subprocess.run([script, "--version"], capture_output=True, text=True).stdout == shown.stdout


@pytest.mark.parametrize(
    ("args", "last_line", "help_on_stderr"),
    [
        ((), f"driml_pl: error: a command is required: one of {COMMAND_NAMES}", True),
        (("predict", "--ckpt_path", "last"), "driml_pl: error: predict is not a command of driml_pl: the agent has no "
         "forward to predict with; its evaluation is validate or test (driml_pl validate --ckpt_path P)", False),
        (("fitt", "--config", "conf/quickstart.yaml"),
         f"driml_pl: error: unknown command 'fitt': the commands are {COMMAND_NAMES} (driml_pl --help)", False),
        (("--config", "conf/quickstart.yaml", "fit"), "driml_pl: error: --config: the command comes first, e.g. "
         f"driml_pl fit --config FILE (commands: {COMMAND_NAMES})", False),
    ],
    ids=["no-command", "predict", "misspelt", "option-first"],
)  # fmt: skip
def test_no_command_predict_and_a_bad_command_are_usage_errors_exit_2_in_one_line(args, last_line, help_on_stderr):
    shown = driml(*args)
    assert shown.returncode == 2 and shown.stdout == ""
    lines = shown.stderr.splitlines()
    assert lines[-1] == last_line
    assert (lines[0] == "usage: driml_pl COMMAND [ARGS ...]") is help_on_stderr
    assert len(lines) == 1 or help_on_stderr


@pytest.mark.slow
def test_a_trainer_commands_help_is_under_the_programs_name_and_a_tools_help_is_its_own():
    fit = driml("fit", "--help")
    assert fit.returncode == 0
    assert fit.stdout.startswith("usage: driml_pl fit [-c CONFIG]")
    assert "driml_pl fit: train from a config" in fit.stdout and "--data.env.game" in fit.stdout
    plot = driml("plot", "--help")
    assert plot.returncode == 0 and "RUN_DIR" in plot.stdout
