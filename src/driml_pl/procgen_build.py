"""Which Procgen binary steps the games: procgen 0.10.7's original build, the one the paper's agents saw, by default.

A Procgen build is a plain C library, ``libenv.so`` (loaded through cffi's ABI mode by `driml_pl.envs.procgen`), and
the game's image assets: one binary serves every Python, and no ``procgen`` Python module is needed. Where they come
from (`files`):

- ``original`` (default): procgen 0.10.7's original wheel (Qt 5.13.2 statically linked), the build of the paper. pip
  installs it only on Python <= 3.10; elsewhere the wheel is fetched once (`fetch`: ``pip download`` of the pinned
  wheel, or a copy of it placed in `cache_dir`; its SHA-256 checked; library and assets extracted) into `cache_dir`.
  All 48 game-settings of `tests/data/procgen_0.10.7_original.json` equal the original's frames, rewards, episode
  starts and emulator states bit for bit (`tests/test_procgen_pixels.py`) on every Python.
- ``installed``: the library and assets of whatever ``procgen`` module is installed (found without importing it):
  ``procgen-mirror==0.10.7`` on 3.11 and 3.12 has a ``libenv.so`` built with Qt 5.9.7 whose frames differ in bossfight,
  caveflyer, climber, coinrun, jumper and ninja (background scaling; 17 of the 48 game-settings), said in one line at
  the start of a run of an affected game. For runs that must continue on the pixels they started on.

``data.env.build`` chooses (`BUILDS`); the run's ``config.yaml`` records which.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

BUILDS = ("original", "installed")
WHEEL = "procgen-0.10.7-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "4b594d14e42f0f2166e59a9e294477b906eb99c90c3343b570b7124cbc865f53"
LIBENV_SHA256 = "f44786431a902e9ae1a32cd44f4aa650f4bdad893240a322e49e6098d6a7a2ea"
ASSETS_SHA256 = "e583b0acba87ab21ada1ff1c13deea2c71375653a27e65105f4412f332fec733"  # `_tree_digest` of its 1,289 assets
LIBENV_MEMBER = "procgen/data/prebuilt/libenv.so"
ASSETS_MEMBER = "procgen/data/assets/"
# the game-settings whose frames procgen-mirror 0.10.7 renders differently (measured, tests/test_procgen_pixels.py)
MIRROR_DIFFERS = ("bossfight", "caveflyer", "climber", "coinrun", "jumper", "ninja")
FETCH_ARGS = ("-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10", "--platform",
              "manylinux2014_x86_64", "procgen==0.10.7", "-d")  # fmt: skip
FETCH_COMMAND = " ".join(("python", *FETCH_ARGS, "DIR"))


class BuildUnavailable(ValueError):
    """The build a run asks for cannot be had here: one line, exit 2, before anything is written."""


class BuildFiles(NamedTuple):
    """What a Procgen build is: its library and the folder of its image assets."""

    library: Path
    assets: Path


def cache_dir() -> Path:
    """Where the original build is kept: ``$DRIML_PROCGEN_DIR``, else ``~/.cache/driml_pl/procgen-0.10.7``."""
    return Path(os.environ.get("DRIML_PROCGEN_DIR") or Path.home() / ".cache" / "driml_pl" / "procgen-0.10.7")


def installed_distribution() -> tuple[str, str] | None:
    """(name, version) of the installed distribution that provides the ``procgen`` module, or None."""
    for name in ("procgen", "procgen-mirror"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return name, metadata.version(name)
    return None


def installed_files() -> BuildFiles | None:
    """The installed ``procgen`` module's library and assets, found without importing it (its ``__init__`` imports
    gym3 and gym), or None where no such module is installed."""
    spec = importlib.util.find_spec("procgen")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = BuildFiles(data / "prebuilt" / "libenv.so", data / "assets")
    return files if files.library.is_file() and files.assets.is_dir() else None


def installed_is_original(files: BuildFiles | None = None) -> bool:
    """Whether the installed ``procgen`` module (``files``, else looked up) is the original build (Python 3.10:
    nothing to fetch)."""
    files = files or installed_files()
    return files is not None and _verified(files.library, _sha256, LIBENV_SHA256)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_digest(folder: Path) -> str:
    """SHA-256 over the sorted relative names of a folder's files and the SHA-256 of each (about 30 ms for the
    assets)."""
    digest = hashlib.sha256()
    for name in sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()):
        digest.update(name.encode() + b"\0" + bytes.fromhex(_sha256(folder / name)))
    return digest.hexdigest()


_VERIFIED: dict[tuple[Path, str], bool] = {}


def _verified(path: Path, digest: Callable[[Path], str], expected: str) -> bool:
    """Whether ``digest(path) == expected``, computed once per path in a process."""
    key = (path, expected)
    if key not in _VERIFIED:
        _VERIFIED[key] = digest(path) == expected
    return _VERIFIED[key]


def _cached() -> BuildFiles | None:
    """The cached original build if it is complete and intact (both checked by SHA-256 at first use in a process)."""
    folder = cache_dir() / "prebuilt"
    files = BuildFiles(folder / "libenv.so", folder / "assets")
    if not (files.library.is_file() and files.assets.is_dir() and (cache_dir() / WHEEL).is_file()):
        return None  # the wheel stays beside what was extracted from it: a damaged extraction is redone from it
    intact = _verified(files.library, _sha256, LIBENV_SHA256) and _verified(files.assets, _tree_digest, ASSETS_SHA256)
    return files if intact else None


def _unavailable(root: Path, why: str) -> BuildUnavailable:
    return BuildUnavailable(
        f"data.env.build=original needs procgen 0.10.7's original build, which is not in {root} and pip could not "
        f"download ({why}); on a machine with the package registry run `{FETCH_COMMAND}` and copy DIR/{WHEEL} to "
        f"{root}/ here (or set DRIML_PROCGEN_DIR to a folder holding it); or data.env.build=installed for an installed "
        f"procgen module's pixels ({', '.join(MIRROR_DIFFERS)} differ on procgen-mirror)"
    )


def fetch(quiet: bool = False) -> BuildFiles:
    """The original build in `cache_dir`, put there if it is not: from the pinned wheel there (kept from an earlier
    download, or copied there by hand on a machine without the registry), else downloaded with pip (the package
    registry pip is configured for); the wheel's SHA-256 checked, its library and assets extracted atomically, under a
    lock (parallel runs fetch once). `BuildUnavailable` in one line if neither works."""
    found = _cached()
    if found is not None:
        return found
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _VERIFIED.clear()  # another process may have fetched while this one waited
        found = _cached()
        if found is not None:
            return found
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            wheel = root / WHEEL
            if not (wheel.is_file() and _sha256(wheel) == WHEEL_SHA256):
                if not quiet:
                    print(f"driml_pl: fetching procgen 0.10.7's original build (a 36 MB wheel, once) into {root}",
                          file=sys.stderr, flush=True)  # fmt: skip
                done = subprocess.run([sys.executable, *FETCH_ARGS, tmp], capture_output=True, text=True)
                wheel = Path(tmp) / WHEEL
                if done.returncode != 0 or not wheel.is_file():
                    raise _unavailable(root, (done.stderr.strip().splitlines() or ["no output"])[-1])
                if _sha256(wheel) != WHEEL_SHA256:
                    got = _sha256(wheel)
                    raise BuildUnavailable(f"the downloaded {WHEEL} has SHA-256 {got}, not {WHEEL_SHA256}: not "
                                           "procgen 0.10.7's original build; refusing it")  # fmt: skip
            staged = Path(tmp) / "prebuilt"
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if name.startswith(ASSETS_MEMBER) and not name.endswith("/"):
                        target = staged / "assets" / name[len(ASSETS_MEMBER) :]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(archive.read(name))
                (staged / "libenv.so").write_bytes(archive.read(LIBENV_MEMBER))
            if (root / "prebuilt").exists():  # damaged or incomplete (a library without assets, say): replaced
                shutil.rmtree(root / "prebuilt")
            os.replace(staged, root / "prebuilt")
            if wheel != root / WHEEL:  # kept: a damaged extraction is redone from it, and the folder can be copied
                os.replace(wheel, root / WHEEL)
            shutil.rmtree(root / "procgen", ignore_errors=True)  # the links an earlier driml_pl loaded procgen through
    _VERIFIED.clear()
    found = _cached()
    if found is None:
        raise BuildUnavailable(f"{root}/prebuilt is not procgen 0.10.7's original build (SHA-256 mismatch)")
    return found


def files(build: str) -> BuildFiles:
    """The library and assets that build ``build`` loads (`BuildUnavailable` in one line where it cannot be had)."""
    if build not in BUILDS:
        raise BuildUnavailable(f"data.env.build={build!r} is not allowed; valid: {', '.join(BUILDS)}")
    installed = installed_files()
    if build == "installed":
        if installed is None:
            raise BuildUnavailable(
                "data.env.build=installed needs an installed procgen module (procgen==0.10.7 on Python <= 3.10, "
                "procgen-mirror==0.10.7 on 3.11 and 3.12: `pip install --no-deps procgen-mirror==0.10.7`) and none is "
                "installed; data.env.build=original (the default) needs none"
            )
        return installed
    if installed is not None and installed_is_original(installed):
        return installed
    return fetch()


def mirror_warning(build: str, game: str) -> str | None:
    """The one line a run of ``game`` on the installed mirror's pixels gets, or None."""
    dist = installed_distribution()
    if build != "installed" or dist is None or dist[0] != "procgen-mirror" or game not in MIRROR_DIFFERS:
        return None
    return (f"driml_pl: warning: data.env.build=installed: {game}'s frames come from procgen-mirror {dist[1]}'s "
            "build, which renders them differently from procgen 0.10.7's original (the paper's); "
            "data.env.build=original gives the original's")  # fmt: skip
