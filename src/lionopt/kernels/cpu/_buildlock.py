"""One kernel build per machine: a file lock beside each cached library.

On a first multi-process launch with an empty cache, every rank would start its own compiler.
``claim(target)`` takes an exclusive ``flock`` on ``<target>.lock`` without waiting: the
process that gets it builds, and hands the lock's file descriptor to the compiler's shell
(``pass_fds``), so the lock lasts exactly as long as the build, even when the process that
started it exits first. Other processes get None and ``wait_for(target)`` blocks until the
lock is free; a background build does that in its thread, so those processes take the Python
path meanwhile. A lock is released by the kernel when its holder dies, so a crashed build
never blocks the next one. Where ``fcntl`` does not exist (Windows) or the lock file cannot be
created (a read-only cache), every process builds for itself, as before.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

__all__ = ["BuildLock", "claim", "wait_for"]


class BuildLock:
    """An exclusive lock on ``<target>.lock``, held through the file descriptor ``fd``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        """Close this process's descriptor (a compiler that inherited it keeps the lock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def _open(target: Path) -> int | None:
    if fcntl is None:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return os.open(_lock_path(target), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


def claim(target: Path) -> BuildLock | bool | None:
    """Try to become the one process that builds ``target``.

    Returns a ``BuildLock`` (build it, then release), None (another process is building it:
    ``wait_for``), or True when no lock can be had here (build without one).
    """
    fd = _open(target)
    if fd is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a file system without flock support
        os.close(fd)
        return True
    return BuildLock(fd)


def wait_for(target: Path, timeout: float) -> bool:
    """Block until no process holds ``target``'s build lock (or ``timeout`` s); True if free."""
    fd = _open(target)
    if fd is None:
        return True
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)  # also drops the shared lock
