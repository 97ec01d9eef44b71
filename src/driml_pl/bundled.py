"""The configs shipped with the package: ``conf/`` of the repository, installed as ``driml_pl/conf/`` by a wheel.

``conf/`` stays the only copy in the repository; ``pyproject.toml`` maps it into the package
(``[tool.setuptools] package-dir`` and ``package-data``), so ``pip install .`` (not editable) installs
``site-packages/driml_pl/conf/{*.yaml,paper/*.yaml}``. From a checkout (``PYTHONPATH=src`` or an editable install)
there is no ``src/driml_pl/conf`` and the repository's ``conf/`` is used.

A command that names a config by its repository path (``fit --config conf/quickstart.yaml``) works from anywhere:
when that path does not exist under the working directory, `resolve_config_args` takes the bundled copy and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """Where the bundled configs are: ``driml_pl/conf`` when installed from a wheel, else the checkout's ``conf/``."""
    packaged = _HERE / "conf"
    return packaged if packaged.is_dir() else _HERE.parents[1] / "conf"


def looked_in() -> str:
    """The places `conf_dir` looks, for error messages."""
    return f"{_HERE / 'conf'} (installed package) and {_HERE.parents[1] / 'conf'} (source checkout)"


def bundled_config(name: str) -> Path | None:
    """The bundled copy of ``name`` (``conf/quickstart.yaml``, ``quickstart.yaml`` or ``paper/c51.yaml``), if any."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        return None
    parts = path.parts[1:] if path.parts[:1] == ("conf",) else path.parts
    candidate = conf_dir().joinpath(*parts) if parts else None
    return candidate if candidate is not None and candidate.is_file() else None


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``--config X`` with X missing under the working directory but bundled: the bundled copy (one note on stderr)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            j, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--config="):
            j, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        if Path(value).exists():
            continue
        found = bundled_config(value)
        if found is not None:
            print(f"driml_pl: --config {value}: not under {Path.cwd()}; using the bundled {found}", file=sys.stderr)
            out[j] = prefix + str(found)
    return out
