"""nox sessions. `nox` runs tests, lint and typecheck; tests_full, smoke, bench and slurm are opt-in (`nox -s NAME`).

Extra arguments after `--` reach the tool (e.g. `nox -s tests -- -k replay`). Every install goes through
constraints.txt (the exact versions CI ran with); `nox -s lock` regenerates it (docs/install.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nox
from packaging.specifiers import InvalidSpecifier, SpecifierSet

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# 2.13.0 is the CPU build kept on the dev/CI machines' disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH = os.environ.get("DRIML_TORCH", "torch==2.13.0")
CONSTRAINTS = ("-c", "constraints.txt")  # torch itself is pinned by TORCH, not there (see `lock`)
# the `mirror` extra, installed with --no-deps (its gym3 and gym would pin numpy < 2); pinned in constraints.txt
MIRROR = "procgen-mirror==0.10.7; python_version >= '3.11' and python_version < '3.13'"


def install_project(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, TORCH)
    session.install(*CONSTRAINTS, "-e", ".[dev]")
    # procgen-mirror's own build, for the tests of data.env.build=installed (its pixels, its warning); --no-deps: its
    # gym3 and gym would pin numpy < 2. It has wheels for Python 3.11 and 3.12 only; elsewhere those tests skip.
    python = session.run("python", "-c", "import sys; print(sys.version_info[1])", silent=True)
    if str(python).strip() in ("11", "12"):
        session.install(*CONSTRAINTS, "--no-deps", "procgen-mirror")


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite: unit tests and one end-to-end test (real Procgen) of every guarantee; pytest takes about
    13 minutes on 2 cores. The tests marked ``full`` (more variants of those guarantees): ``nox -s tests_full``."""
    install_project(session)
    session.run("pytest", "-m", "not full", *(session.posargs or ["-q"]))


@nox.session
def tests_full(session: nox.Session) -> None:
    """Every test, the ``full`` variants included (about 30 minutes on 2 cores); run it before a release."""
    install_project(session)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install(*CONSTRAINTS, "ruff>=0.4")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on src/."""
    install_project(session)
    session.run("mypy", *session.posargs)


@nox.session
def smoke(session: nox.Session) -> None:
    """A short real run of conf/quickstart.yaml through the CLI (about a minute)."""
    install_project(session)
    root = session.create_tmp()
    session.run(
        "python", "-m", "driml_pl", "fit", "--config", "conf/quickstart.yaml",
        "--trainer.default_root_dir", f"{root}/smoke", "--data.total_env_steps", "4800",
        "--data.updates_per_epoch", "100", *session.posargs,
    )  # fmt: skip


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmarks (about 15 minutes): throughput tables at the CPU goal's size (batch 32, 64x64 input; 1 and 7
    updates per Lightning step) and with the paper's network and batch, host-dispatched operations per update,
    checkpoint cost at two replay sizes, replay
    memory, and 1 vs 2 DDP ranks (gloo, CPU) at the same global batch."""
    install_project(session)
    small = ["--batch", "32", "--obs", "64", "64", "--num-envs", "16", "--replay-ratio", "4", "--updates", "140",
             "--replay-size", "20000", "--log-every", "10"]  # fmt: skip
    session.run("python", "benchmarks/throughput.py", *small, "--per-step", "1", *session.posargs)
    session.run("python", "benchmarks/throughput.py", *small, "--per-step", "7", *session.posargs)
    session.run("python", "benchmarks/throughput.py", "--updates", "42", "--per-step", "7", *session.posargs)
    session.run("python", "benchmarks/host_ops.py")  # operations the host dispatches per update (a GPU proxy)
    session.run("python", "benchmarks/checkpoint_cost.py")
    session.run("python", "benchmarks/replay_memory.py")
    session.run("python", "benchmarks/ddp_throughput.py")  # 1 vs 2 gloo CPU ranks, same global batch
    session.run("python", "benchmarks/ddp_throughput.py", "--batch", "128", "--num-envs", "32", "--replay-ratio", "8",
                "--updates", "112", "--per-step", "7", "--log-every", "2", "--skip", "1")  # fmt: skip


@nox.session
def slurm(session: nox.Session) -> None:
    """The cluster path for real (about 30 minutes on the shared 2-core machine; needs root): a one-node SLURM from
    tools/slurm/up.sh, then the grid through real sbatch (array, skip, report job, requeue, time limit, submitit),
    `srun` with two tasks, and two torchrun nodes (tests/test_slurm.py, tests/test_multinode.py)."""
    install_project(session)
    session.run("bash", "tools/slurm/up.sh", external=True)
    env = {"DRIML_SLURM": "1", "DRIML_MULTINODE": "1", "OMP_NUM_THREADS": "1"}
    # its own basetemp: another pytest on the machine prunes /tmp/pytest-of-<user> while these jobs still write there
    base = f"--basetemp={session.create_tmp()}/pytest"
    session.run("pytest", "-v", base, "tests/test_slurm.py", "tests/test_multinode.py", *session.posargs, env=env)


@nox.session(venv_backend="none")
def bench_gpu(session: nox.Session) -> None:
    """The GPU benchmark (one CUDA machine, under 5 minutes): runs benchmarks/bench_gpu.sh with the current Python
    environment, which must already hold a CUDA torch and the project (no install here: GPU images pin their torch)."""
    session.run("bash", "benchmarks/bench_gpu.sh", *session.posargs, external=True)


# The installed distributions of a venv: name, version, Requires-Python (run inside the session's interpreter).
_INSTALLED = (
    "import json, importlib.metadata as m; print(json.dumps(sorted({d.metadata['Name'].lower().replace('_', '-'): "
    "(d.version, d.metadata.get('Requires-Python') or '') for d in m.distributions()}.items())))"
)
_NOT_PINNED = ("driml-pl", "pip", "setuptools", "wheel", "torch", "triton")  # torch: the machine's build, via TORCH


@nox.session(reuse_venv=False)
def lock(session: nox.Session) -> None:
    """Regenerate constraints.txt: a fresh venv, TORCH and the project with every extra installed without
    constraints (what a fresh machine gets today), then every version frozen. torch, its CUDA wheels and the
    project are left out; a version that cannot install on Python 3.10 gets a ``python_version`` marker.
    Review the diff, run `nox` with it, commit it."""
    extras, no_deps = "dev,cluster", [MIRROR]
    try:
        import tomllib

        optional = tomllib.loads(Path("pyproject.toml").read_text())["project"]["optional-dependencies"]
        extras = ",".join(name for name in optional if name != "mirror")  # procgen-mirror goes in --no-deps
        no_deps = optional.get("mirror", [])  # exact pins with markers: copied as they are
    except ImportError:  # Python 3.10 runs nox: the extras known when this was written
        pass
    session.install(TORCH)
    session.install("-e", f".[{extras}]")
    installed = json.loads(session.run("python", "-c", _INSTALLED, silent=True) or "[]")
    python = session.run("python", "-c", "import platform; print(platform.python_version())", silent=True)
    lines = [
        "# The exact versions `nox` (CI) installs with: `pip install -c constraints.txt ...` (docs/install.md).",
        f"# Generated by `nox -s lock` on Python {str(python).strip()} with {TORCH} (extras: {extras}); torch and "
        "its CUDA wheels are pinned by the noxfile's TORCH, not here.",
    ]
    for name, (version, requires_python) in installed:
        if name in _NOT_PINNED or name.startswith("nvidia-"):
            continue
        try:
            on_310 = SpecifierSet(requires_python).contains("3.10.99")
        except InvalidSpecifier:
            on_310 = True
        marker = "" if on_310 else '; python_version >= "3.11"'
        lines.append(f"{name}=={version}{marker}")
    lines += [pin.replace("'", '"') for pin in no_deps]
    Path("constraints.txt").write_text("\n".join(lines) + "\n")
    session.log(f"wrote constraints.txt ({len(lines) - 2} pins)")
