"""Which Procgen binary steps the games: procgen 0.10.7's original build, the one the paper's agents saw, by default.

procgen's Python layer loads a plain C library, ``procgen/data/prebuilt/libenv.so``, through gym3's cffi (ABI mode,
dlopen): one binary serves every Python. The ``procgen`` module pip installs differs by Python:

- 3.10: ``procgen==0.10.7``, the original build (Qt 5.13.2 statically linked): its own ``libenv.so`` is used.
- 3.11 and 3.12: ``procgen-mirror==0.10.7``: the same Python layer and assets, but a ``libenv.so`` built with Qt 5.9.7
  whose frames differ in bossfight, caveflyer, climber, coinrun, jumper and ninja (background scaling; 17 of the 48
  game-settings of `tests/data/procgen_0.10.7_original.json`). The original ``libenv.so`` is taken from the original
  wheel instead: fetched once (`fetch`: ``pip download`` of the pinned wheel, its SHA-256 checked, the library
  extracted) into `cache_dir`, and loaded by the mirror's Python layer. With it, all 48 game-settings equal the
  original build's frames, rewards, episode starts and emulator states bit for bit (`tests/test_procgen_pixels.py`).

``data.env.build`` chooses (`BUILDS`): ``original`` (default) or ``installed`` (whatever ``libenv.so`` the installed
``procgen`` module has: on 3.11 and 3.12 the mirror's pixels, said in one line at the start of a run of an affected
game). The run's ``config.yaml`` records which.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

BUILDS = ("original", "installed")
WHEEL = "procgen-0.10.7-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "4b594d14e42f0f2166e59a9e294477b906eb99c90c3343b570b7124cbc865f53"
LIBENV_SHA256 = "f44786431a902e9ae1a32cd44f4aa650f4bdad893240a322e49e6098d6a7a2ea"
LIBENV_MEMBER = "procgen/data/prebuilt/libenv.so"
# the game-settings whose frames procgen-mirror 0.10.7 renders differently (measured, tests/test_procgen_pixels.py)
MIRROR_DIFFERS = ("bossfight", "caveflyer", "climber", "coinrun", "jumper", "ninja")
FETCH_ARGS = ("-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10", "--platform",
              "manylinux2014_x86_64", "procgen==0.10.7", "-d")  # fmt: skip
FETCH_COMMAND = " ".join(("python", *FETCH_ARGS, "DIR"))
_SWAP = threading.Lock()


class BuildUnavailable(ValueError):
    """The build a run asks for cannot be had here: one line, exit 2, before anything is written."""


def cache_dir() -> Path:
    """Where the original ``libenv.so`` is kept: ``$DRIML_PROCGEN_DIR``, else ``~/.cache/driml_pl/procgen-0.10.7``."""
    return Path(os.environ.get("DRIML_PROCGEN_DIR") or Path.home() / ".cache" / "driml_pl" / "procgen-0.10.7")


def installed_distribution() -> tuple[str, str] | None:
    """(name, version) of the installed distribution that provides the ``procgen`` module, or None."""
    for name in ("procgen", "procgen-mirror"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return name, metadata.version(name)
    return None


def installed_is_original() -> bool:
    return installed_distribution() == ("procgen", "0.10.7")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached() -> Path | None:
    """The cached library folder if it holds the original ``libenv.so`` (checked by its SHA-256 at first use in a
    process), else None."""
    folder = cache_dir() / "prebuilt"
    library = folder / "libenv.so"
    if not library.is_file():
        return None
    if _VERIFIED.get(library) is None:
        _VERIFIED[library] = _sha256(library) == LIBENV_SHA256
    return folder if _VERIFIED[library] else None


_VERIFIED: dict[Path, bool] = {}


def fetch(quiet: bool = False) -> Path:
    """Download the pinned original wheel with pip (the package registry pip is configured for), check its SHA-256,
    and extract its ``libenv.so`` into `cache_dir` (atomically, under a lock: parallel runs fetch once). Returns the
    library's folder; `BuildUnavailable` in one line if pip cannot get it."""
    found = _cached()
    if found is not None:
        return found
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _cached()
        if found is not None:
            return found
        if not quiet:
            print(f"driml_pl: fetching procgen 0.10.7's original libenv.so (a 36 MB wheel, once) into {root}",
                  file=sys.stderr, flush=True)  # fmt: skip
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            done = subprocess.run([sys.executable, *FETCH_ARGS, tmp], capture_output=True, text=True)
            wheel = Path(tmp) / WHEEL
            if done.returncode != 0 or not wheel.is_file():
                why = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise BuildUnavailable(
                    f"data.env.build=original needs procgen 0.10.7's original libenv.so, which is not in {root} and "
                    f"pip could not download ({why}); on a machine with the package registry run `{FETCH_COMMAND}`, "
                    f"then `python -m zipfile -e DIR/{WHEEL} X` and copy X/{LIBENV_MEMBER} to {root}/prebuilt/ here "
                    "(or set DRIML_PROCGEN_DIR to a folder holding prebuilt/libenv.so); or data.env.build=installed "
                    f"for the installed build's pixels ({', '.join(MIRROR_DIFFERS)} differ on procgen-mirror)"
                )
            if _sha256(wheel) != WHEEL_SHA256:
                raise BuildUnavailable(f"the downloaded {WHEEL} has SHA-256 {_sha256(wheel)}, not {WHEEL_SHA256}: "
                                       "not procgen 0.10.7's original build; refusing it")  # fmt: skip
            staged = Path(tmp) / "prebuilt"
            staged.mkdir()
            with zipfile.ZipFile(wheel) as archive, archive.open(LIBENV_MEMBER) as src:
                (staged / "libenv.so").write_bytes(src.read())
            if (root / "prebuilt").exists():  # a damaged copy (its SHA-256 did not match): replaced
                shutil.rmtree(root / "prebuilt")
            os.replace(staged, root / "prebuilt")
    _VERIFIED.pop(root / "prebuilt" / "libenv.so", None)
    found = _cached()
    if found is None:
        raise BuildUnavailable(f"{root}/prebuilt/libenv.so is not procgen 0.10.7's original build (SHA-256 mismatch)")
    return found


def library_dir(build: str) -> Path | None:
    """The folder of the ``libenv.so`` that build ``build`` loads, or None for the installed module's own (also for
    ``original`` where the installed module is the original build, Python 3.10)."""
    if build not in BUILDS:
        raise BuildUnavailable(f"data.env.build={build!r} is not allowed; valid: {', '.join(BUILDS)}")
    if build == "installed" or installed_is_original():
        return None
    return fetch()


def mirror_warning(build: str, game: str) -> str | None:
    """The one line a run of ``game`` on the installed mirror's pixels gets, or None."""
    dist = installed_distribution()
    if build != "installed" or dist is None or dist[0] != "procgen-mirror" or game not in MIRROR_DIFFERS:
        return None
    return (f"driml_pl: warning: data.env.build=installed: {game}'s frames come from procgen-mirror {dist[1]}'s "
            "build, which renders them differently from procgen 0.10.7's original (the paper's); "
            "data.env.build=original gives the original's")  # fmt: skip


@contextlib.contextmanager
def loading_from(folder: Path | None) -> Iterator[None]:
    """While an env is built, procgen's Python layer loads ``folder/libenv.so`` (procgen takes its library folder
    from ``procgen.env.SCRIPT_DIR``/data/prebuilt; the assets stay the installed module's, which are the original's).
    ``None``: the installed module's own library."""
    if folder is None:
        yield
        return
    import procgen.env as procgen_env

    with _SWAP:
        saved = procgen_env.SCRIPT_DIR
        shadow = folder.parent / "procgen"  # procgen reads SCRIPT_DIR/data/prebuilt: a folder of links to ours
        prebuilt = shadow / "data" / "prebuilt"
        if not (prebuilt / "libenv.so").exists():
            prebuilt.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.symlink(folder, prebuilt)
        procgen_env.SCRIPT_DIR = str(shadow)
        try:
            yield
        finally:
            procgen_env.SCRIPT_DIR = saved
