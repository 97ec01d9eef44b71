from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _absl_writes_to_the_real_stderr() -> None:
    """rliable imports absl.logging, whose handler keeps the ``sys.stderr`` of its import: under pytest, the file
    pytest captures fd 2 into. Importing submitit runs ``logging.config.dictConfig``, which closes every handler, and
    absl's handler closes its stream when that stream is not the ``sys.stderr`` of the moment (a test's capsys). So a
    test that imports submitit after a module that imported rliable was collected closed pytest's capture file, and
    the session died ("lost sys.stderr"). Pointed at the process's own stderr, absl's handler leaves it open."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # rliable (and absl with it) not installed
        return
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_writes_to_the_real_stderr()


def paper(method: str) -> list[Path]:
    """The paper configs of ``method``: the shared protocol, then what the method changes."""
    return [CONF / "paper" / "protocol.yaml", CONF / "paper" / f"{method}.yaml"]


def config_args(config: Path) -> list[str]:
    """``--config`` for a shipped config; a paper method file comes after the protocol it changes."""
    paper_method = config.parent.name == "paper" and config.name != "protocol.yaml"
    files = [config.parent / "protocol.yaml", config] if paper_method else [config]
    return [x for f in files for x in ("--config", str(f))]


def tiny_args(
    run_dir: Path, budget: int = 512, config: Path | Sequence[Path] = CONF / "quickstart.yaml", **extra: object
) -> list[str]:
    """Overrides that turn a config (default conf/quickstart.yaml; several are merged left to right) into a run of
    seconds on real Procgen."""
    configs = [config] if isinstance(config, Path) else list(config)
    args = {
        "--trainer.default_root_dir": str(run_dir),
        "--trainer.enable_model_summary": "false",
        "--trainer.log_every_n_steps": "1",
        "--data.env.game": "bigfish",
        "--data.env.num_envs": "8",
        "--data.env.num_levels": "20",
        "--data.eval_episodes": "2",
        "--data.total_env_steps": str(budget),
        "--data.replay_size": "2048",
        "--data.batch_size": "16",
        "--data.replay_ratio": "2",
        "--data.learning_starts": "64",
        "--data.updates_per_epoch": "12",
        "--data.updates_per_batch": "1",
        "--model.target_update_interval": "5",
        "--model.feature_dim": "64",
        "--model.rkhs_dim": "32",
    }
    args.update({k: str(v) for k, v in extra.items()})
    return ["fit"] + [x for c in configs for x in ("--config", str(c))] + [x for kv in args.items() for x in kv]


SESSION_ENVIRON = dict(os.environ)  # at collection, before any fixture or test ran


@pytest.fixture(autouse=True)
def _restore_environ():
    """Each test ends with the environment the session started with: an in-process fit with ``--torch_threads N``
    exports OMP_NUM_THREADS (for its DDP ranks), which would reach every later subprocess fit and change its float
    results against the session's shared ``straight`` run. The snapshot is the session's, not the test's: a module or
    session fixture is set up before this function-scoped one, so a snapshot taken here would keep what it exported."""
    yield
    current = os.environ.get("PYTEST_CURRENT_TEST")  # pytest's own, removed by pytest after the teardown
    os.environ.clear()
    os.environ.update(SESSION_ENVIRON)
    if current is not None:
        os.environ["PYTEST_CURRENT_TEST"] = current


@pytest.fixture(scope="session", autouse=True)
def _original_procgen_build() -> None:
    """Fetch procgen 0.10.7's original build (library and assets) once, before any test (`driml_pl.procgen_build`):
    otherwise the first fit of a fresh machine prints the fetch's line, which a test that reads a run's one line would
    count."""
    from driml_pl import procgen_build

    if not procgen_build.installed_is_original():
        procgen_build.fetch(quiet=True)


@pytest.fixture(scope="session")
def straight(tmp_path_factory) -> Path:
    """test_checkpoint.py's tiny run made straight through, once for the session: what the killed, signalled and
    resumed runs of test_checkpoint.py and test_lifecycle.py must equal. Read-only (tests copy it to change it)."""
    from test_checkpoint import fit

    run = tmp_path_factory.mktemp("straight") / "run"
    fit(run)
    return run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
