"""One process per run directory: the lock every ``fit`` holds on ``<run>/run.lock`` for its whole life.

The lock is an ``fcntl.flock`` on that file, so the kernel releases it when the process ends in any way (a SIGKILL,
an OOM kill, a node reboot of a local disk): there is never a stale lock to remove by hand. The file holds the
holder's host and pid (for the refusal's message); it stays behind after a kill, unlocked and harmless, and is
removed when a fit ends normally.

A second ``fit`` of the same directory is refused before it writes anything: `RunLockedError` (a ValueError, so the
CLI prints one ``driml_pl: error:`` line and exits 2). Under DDP only global rank 0 takes the lock: the ranks Lightning
starts re-run the command line and are recognised by their rank variables (`holds_run_lock`).

For the grid launcher and other tools: ``lock_holder(run_dir)`` says whether a fit holds the directory now (and who),
without taking the lock away from a fit that starts at the same moment for longer than an instant; ``RunLock`` is
the lock itself (a context manager).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = "run.lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunLockedError(ValueError):
    """The run directory is locked by another live process; the message names it (host, pid)."""


def holds_run_lock() -> bool:
    """Whether this process is the one of its run that holds the lock: global rank 0. A process started by a DDP
    launcher (Lightning's, torchrun, SLURM) carries its rank in the environment; every rank variable set must be 0."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def _describe(text: str) -> str:
    parts = dict(p.split("=", 1) for p in text.split() if "=" in p)
    if "host" in parts and "pid" in parts:
        return f"host {parts['host']}, pid {parts['pid']}"
    return "a process that has not written its name yet"


class RunLock:
    """The exclusive lock on ``<run_dir>/run.lock``.

    Args:
        run_dir: the run directory (``trainer.default_root_dir``); created when the lock is taken.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # directories the lock created (innermost first), removed again if left empty

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _try(self) -> int | None:
        """One attempt: the locked descriptor of the file now at ``path``, or None if another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:  # the file may have been removed (a holder ending) between our open and our lock: then try again
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return -1
        return fd

    def acquire(self, wait_s: float = 1.0) -> None:
        """Take the lock (waiting up to ``wait_s`` for a holder that only looks, see `lock_holder`), then write
        ``host=... pid=...`` into the file. Raises `RunLockedError` naming the holder."""
        if self._fd is not None:
            return
        self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            fd = self._try()
            if fd is not None and fd >= 0:
                break
            if fd is None and time.monotonic() >= deadline:
                holder = _describe(self._read())
                self._remove_created_dir()
                raise RunLockedError(_refusal(self.run_dir, holder))
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.write(fd, f"host={socket.gethostname()} pid={os.getpid()} since={since}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def _read(self) -> str:
        for _ in range(20):  # a holder writes its name right after locking: give it a moment
            with contextlib.suppress(OSError):
                text = self.path.read_text()
                if "pid=" in text:
                    return text
            time.sleep(0.05)
        return ""

    def _remove_created_dir(self) -> None:
        for directory in self._created:
            try:
                directory.rmdir()  # only if empty
            except OSError:
                break
        self._created = []

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other process can be locking it) and unlock; a run
        directory this lock created and nothing else wrote into is removed too."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds the run directory's lock now (``host H, pid P``), or None if nobody does. Looks without writing:
    a shared lock taken and dropped at once (a fit starting at that instant waits for it, see `RunLock.acquire`)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _describe(RunLock(run_dir)._read())
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refuse_if_locked(run_dir: str | Path) -> None:
    """Raise `RunLockedError` if a live process holds ``run_dir``'s lock (writes nothing, takes nothing)."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunLockedError(_refusal(Path(run_dir), holder))


def _refusal(run_dir: Path, holder: str) -> str:
    return (
        f"trainer.default_root_dir={run_dir} is in use by another fit ({holder}; lock file {run_dir / LOCK_NAME}): "
        "wait for it to end, stop it, or pick another --trainer.default_root_dir"
    )


_HELD: RunLock | None = None  # the lock of this process's fit (at most one)


def hold_for_fit(run_dir: str | Path) -> None:
    """The fit's hook (``DRIMLCLI._instantiate_trainer``): on global rank 0, take the lock of ``run_dir`` for the rest
    of the process's fit (`release_fit_lock` ends it). Raises `RunLockedError` before anything is written."""
    global _HELD
    if not holds_run_lock():
        return
    lock = RunLock(run_dir)
    if _HELD is not None:
        if _HELD.path == lock.path:
            return
        release_fit_lock()
    lock.acquire()
    _HELD = lock


def release_fit_lock() -> None:
    """End the fit's lock (the CLI's ``main`` calls it on the way out; a dying process needs no call)."""
    global _HELD
    if _HELD is not None:
        _HELD.release()
        _HELD = None
