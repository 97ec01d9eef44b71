"""A real small filesystem for a test: a tmpfs (the dev and CI machines run as root), unmounted afterwards."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mount: Path, size: str, prepare: Callable[[Path], None] | None = None,
          read_only: bool = False) -> Iterator[Path]:  # fmt: skip
    """Mount a tmpfs of ``size`` (``"48m"``) at ``mount``; ``prepare`` fills it, then ``read_only`` remounts it
    read-only. Skips the test where mounting is not allowed."""
    mount.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        if prepare is not None:
            prepare(mount)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
