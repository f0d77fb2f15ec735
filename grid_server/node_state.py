"""What a process serving a node directory holds once, whatever roots it mounts: the grid connection, the disk
cache of downloaded content, the spare-key filler, and the state directory `NODEDIR/private/blackmatch` (0700).

Each mounted root keeps its own journal and local files under `roots/KEY/` (KEY a hash of the root cap, so the
cap itself never names a file): a journal's records name directories by cap, so they belong to no root in
particular, but its compaction and the removal of stale local files assume one filesystem owns them. The read
cache is shared by all roots; its lock (taken by `ReadCache`) makes one process at a time the user of a node
directory, which is what keeps a `--no-split` mount and a grid server from both writing there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from lafs_core.caps import DirectoryCap
from lafs_core.errors import LafsError
from lafs_core.grid.grid import Grid
from lafs_core.grid.nodedir import LeaseRenewalConfig, NodeDirectory
from lafs_core.grid.servers import open_grid

from .read_cache import CacheInUseError, ReadCache
from .server_files import state_directory

SPARE_KEYS = 4  # RSA keys kept ready for mkdir (each takes ~50 ms of CPU to make)
RUN_BITS = 32  # inode and handle numbers are RUN << RUN_BITS | a counter (see NodeState.run)


@dataclass(frozen=True)
class NodeState:
    grid: Grid
    read_cache: ReadCache
    directory: Path
    # Which start of a process serving this node directory this is (1, 2, ...). Inode and file handle numbers
    # begin at `run << RUN_BITS`, so a grid server started again under live mounts never gives out a number the
    # kernel still holds from the one before: an old inode is unknown (ESTALE, and the kernel looks its path up
    # again), an old handle is refused, and neither can reach another file.
    run: int
    lease_renewal: LeaseRenewalConfig  # how each root's leases are renewed in the background (tahoe.cfg)

    @property
    def first_number(self) -> int:
        return self.run << RUN_BITS

    def root_directory(self, root: DirectoryCap) -> Path:
        """`roots/KEY` for one root (0700). A journal and local files left at the top level by a version before
        roots had their own directory move into the first root opened: their records name their directories."""
        path = self.directory / "roots" / root_key(root)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for legacy in ("journal", "files"):  # each moved whenever it is still there: a crash midway loses none
            if (self.directory / legacy).exists() and not (path / legacy).exists():
                os.rename(self.directory / legacy, path / legacy)
        return path


def root_key(root: DirectoryCap) -> str:
    """The name of a root's state directory: a hash of its cap, so the cap names no file; what `status` calls
    a root that no alias names."""
    return hashlib.sha256(b"blackmatch root v1:" + root.to_string().encode()).hexdigest()[:24]


def next_run(directory: Path) -> int:
    """Count one more start in `directory/runs` and return it. The caller holds the node directory (the read
    cache's lock), so no other process counts at the same time; the file is replaced whole, never torn."""
    path = directory / "runs"
    try:
        previous = int(path.read_text())
    except (OSError, ValueError):
        previous = 0
    run = previous % ((1 << (63 - RUN_BITS)) - 1) + 1
    temporary = path.with_name("runs.new")
    temporary.write_text(f"{run}\n")
    os.replace(temporary, path)
    return run


@asynccontextmanager
async def open_node_state(node: NodeDirectory, cache_size: int) -> AsyncIterator[NodeState]:
    lease_renewal = node.lease_renewal()  # a bad setting fails the start, not a root's renewal later
    grid = open_grid(node)
    if not grid.servers:
        raise LafsError(f"{node.path} configures no storage servers blackmatch can use")
    directory = state_directory(node)
    try:
        try:
            cache = ReadCache(directory / "cache", grid, cache_size)
            await cache.__aenter__()
        except CacheInUseError:
            raise LafsError(
                f"{node.path} is in use by another blackmatch process (its grid server, or a --no-split mount)"
            ) from None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(grid.keys.keep_filled, SPARE_KEYS)
                yield NodeState(grid, cache, directory, next_run(directory), lease_renewal)
                nursery.cancel_scope.cancel()
        finally:
            await cache.aclose()
    finally:
        await grid.aclose()
