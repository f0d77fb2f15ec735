"""A pid file locked (flock) for as long as its process lives, which tells a live process from a stale file.

The grid server holds one (`server.pid`) and so does each mount's serving process (`mounts/KEY.pid`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class PidLock:
    def __init__(self, path: Path, extra_lines: tuple[str, ...] = ()) -> None:
        """Take the lock and write our pid (and `extra_lines`); BlockingIOError if a live process holds it."""
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, "".join(f"{line}\n" for line in (str(os.getpid()), *extra_lines)).encode())

    def add_line(self, line: str) -> None:
        """Append a line: what the process tells whoever holds the file open, still readable there after release
        has removed it (`blackmatch unmount` learns so how a mount's uploads ended)."""
        os.write(self.fd, f"{line}\n".encode())

    def release(self) -> None:
        """Remove the file (unless another process has replaced it since) and let go of the lock."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)


def lock_held(path: Path) -> bool:
    """Whether a live process holds the lock on the pid file at `path` (False if there is no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return lock_held_on(fd)
    finally:
        os.close(fd)


def lock_held_on(fd: int) -> bool:
    """Whether a live process holds the lock on the pid file open at `fd` (a shared lock is tried and dropped)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
