"""A regular (non-editable) install finds the bundled configs (issue 19.8): the grid and `fit --config conf/...`.

The checkout is copied (tracked and untracked files, the conf symlink as a symlink), built into a wheel and the
wheel installed (``--no-deps``) into a venv that sees this interpreter's packages (torch, Lightning, Procgen) but not
the checkout: PYTHONPATH is dropped, and the venv's own site-packages come before the editable
install's path. "This interpreter" is the one running the tests (nox's venv), never the base interpreter it was made
from: a venv made with ``--system-site-packages`` sees the base's packages, which on a fresh machine hold no
Lightning. About 30 s on the 2-core machine, most of it pip building the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _copy_checkout(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


def _see_these_packages(python: str) -> None:
    """The venv of ``python`` also sees this interpreter's site-packages, after its own (a ``.pth`` of plain paths:
    their own ``.pth`` files, the editable install's among them, are not run)."""
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    paths = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(own) / "_driml_test_parent.pth").write_text("".join(f"{p}\n" for p in paths))


def test_a_regular_install_runs_the_grid_and_bundled_configs_from_anywhere(tmp_path: Path) -> None:
    repo, venv, elsewhere = _copy_checkout(tmp_path / "repo"), tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    py = str(venv / "bin" / "python")
    _see_these_packages(py)
    # the wheel is built by this interpreter's setuptools (a 3.11 venv's own is 65.5, which needs `wheel`)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(repo), "-w",
             str(tmp_path / "dist")]  # fmt: skip
    subprocess.run(build, check=True, env=env, timeout=240, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("driml_pl-*.whl")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=env, timeout=240)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([py, *args], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=120)

    site = run("-c", "import driml_pl, sysconfig; print(driml_pl.__file__); print(sysconfig.get_paths()['purelib'])")
    package, purelib = site.stdout.split()
    assert package == f"{purelib}/driml_pl/__init__.py"  # the wheel's copy, not the checkout
    bundled = Path(purelib) / "driml_pl" / "conf"
    assert not bundled.is_symlink() and {p.name for p in (bundled / "paper").iterdir()} >= {"c51.yaml", "ada.yaml"}
    for name in ("quickstart.yaml", "paper/c51.yaml", "paper/ada.yaml"):
        assert (bundled / name).read_bytes() == (ROOT / "conf" / name).read_bytes(), name

    grid = run("-m", "driml_pl", "grid", "--dry-run", "--methods", "c51", "--games", "bigfish", "--seeds", "0")
    assert grid.returncode == 0, grid.stderr[-2000:]
    assert "1 runs: 0 finished (skipped), 0 to resume, 1 to start" in grid.stdout
    assert (
        f"fit --config {bundled}/paper/protocol.yaml --config {bundled}/paper/c51.yaml --data.env.game bigfish "
        "--seed_everything 0"
    ) in grid.stdout
    assert not (elsewhere / "runs").exists()  # a dry run writes nothing

    missing = run("-m", "driml_pl", "grid", "--dry-run", "--methods", "c51", "--conf-dir", "myconf")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"driml_pl grid: error: --conf-dir {elsewhere}/myconf: no such directory"

    # `fit --config conf/quickstart.yaml`, the README's first command, from a directory without conf/
    shown = run("-m", "driml_pl", "fit", "--config", "conf/quickstart.yaml", "--print_config")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"driml_pl: --config conf/quickstart.yaml: not under {elsewhere}; using the bundled " in shown.stderr
    assert "game: fruitbot" in shown.stdout and "num_levels: 1" in shown.stdout


def test_a_missing_config_path_takes_the_bundled_copy_and_a_local_file_wins(tmp_path, monkeypatch, capsys) -> None:
    from driml_pl.bundled import conf_dir, resolve_config_args

    monkeypatch.chdir(tmp_path)
    bundled = conf_dir()
    assert resolve_config_args(["fit", "--config", "conf/quickstart.yaml", "--x", "1"]) == [
        "fit", "--config", str(bundled / "quickstart.yaml"), "--x", "1"]  # fmt: skip
    assert resolve_config_args(["--config=paper/c51.yaml"]) == [f"--config={bundled / 'paper' / 'c51.yaml'}"]
    note = capsys.readouterr().err.splitlines()
    assert note[0] == f"driml_pl: --config conf/quickstart.yaml: not under {tmp_path}; using the bundled " + str(
        bundled / "quickstart.yaml")  # fmt: skip
    assert len(note) == 2
    for kept in (["--config", "conf/none.yaml"], ["--config", "../conf/quickstart.yaml"], ["--config", "/x.yaml"]):
        assert resolve_config_args(kept) == kept  # not bundled: the CLI's own error names the path
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "quickstart.yaml").write_text("seed_everything: 3\n")
    assert resolve_config_args(["--config", "conf/quickstart.yaml"]) == ["--config", "conf/quickstart.yaml"]
    assert capsys.readouterr().err == ""
