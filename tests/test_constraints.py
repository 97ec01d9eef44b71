"""Issue 19 part 7: constraints.txt (what CI installs with) pins every dependency, inside pyproject.toml's bounds.

A dependency added to pyproject.toml without rerunning `nox -s lock` fails here, naming it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOT_PINNED = {"torch"}  # the machine's build: the noxfile's TORCH pins it (docs/install.md)

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else None
pytestmark = pytest.mark.skipif(tomllib is None, reason="tomllib needs Python >= 3.11")


def _pins() -> dict[str, tuple[str, str]]:
    """name -> (exact version, marker or '') of every line of constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^;\s]+)\s*(?:;\s*(.*))?", line.strip())
        assert m, f"not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = (m.group(2), m.group(3) or "")
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[union-attr]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_inside_its_bounds():
    pins = _pins()
    checked = 0
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in NOT_PINNED or (req.marker is not None and not req.marker.evaluate()):
            continue  # procgen on Python 3.10, procgen-mirror on >= 3.11: only the one this Python installs
        assert name in pins, f"{req.name} is in pyproject.toml but not in constraints.txt: run `nox -s lock`"
        version, marker = pins[name]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} is outside {req}"
        assert not marker or Marker(marker).evaluate(), f"{name}'s pin does not apply on this Python: {marker}"
        checked += 1
    assert checked >= 10  # the project's own dependencies and the dev extra's, not an empty file


def test_nox_installs_through_the_constraints():
    noxfile = (ROOT / "noxfile.py").read_text()
    assert 'CONSTRAINTS = ("-c", "constraints.txt")' in noxfile
    installs = re.findall(r"session\.install\(([^)]*)\)", noxfile)
    unconstrained = [args for args in installs if not args.startswith("*CONSTRAINTS")]
    assert unconstrained == ["TORCH", '"-e", f".[{extras}]"']  # only `nox -s lock`, which makes the file
