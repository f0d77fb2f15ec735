"""Where a node directory's grid server keeps its socket, pid and log: `NODEDIR/private/blackmatch/server.*`.

Both halves need these names (the mount finds the server by them), so they live apart from the server's code:
importing this module costs the mounting process nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lafs_core.grid.nodedir import NodeDirectory


def state_directory(node: NodeDirectory) -> Path:
    """`NODEDIR/private/blackmatch` (made 0700 if missing): the server's files, the mounts', roots, the cache."""
    path = node.private / "blackmatch"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class ServerFiles:
    directory: Path  # NODEDIR/private/blackmatch, 0700

    @classmethod
    def of(cls, node: NodeDirectory) -> ServerFiles:
        return cls(state_directory(node))

    @property
    def socket(self) -> Path:
        """The RPC socket (0600)."""
        return self.directory / "server.sock"

    @property
    def pid(self) -> Path:
        """The server's pid, locked (flock) for as long as it lives: a live server from a stale file."""
        return self.directory / "server.pid"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"


SUN_PATH_MAX = 107  # bytes a Unix socket address can hold (sockaddr_un.sun_path, less its NUL)


@contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address for `path` that fits in a socket address: the path itself, or, for a node directory deep
    enough that it does not fit, the same file reached through /proc/self/fd of its directory, held open."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield os.fspath(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)
