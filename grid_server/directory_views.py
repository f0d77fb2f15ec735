"""Directory views: one per directory the kernel has been shown, its grid listing re-read when older than the cache
timeout, and the least recently used ones let go once nothing uses them.

A view (nodes.Directory) is the listing as last read, overlaid by the directory's pending changes (write_back.py).
A walk over a big tree (find, ls -lR, du) reads a listing per directory; keeping them all would make the server's
memory grow with every directory ever visited, so beyond `bound` the views nothing uses go, oldest use first. What
"in use" means (an inode refers to the view, its changes wait to be published, its listing is being read) is the
filesystem's knowledge, given as a predicate.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from lafs_core.caps import DirectoryCap
from lafs_core.errors import LafsError
from lafs_core.grid.directory import read_directory
from lafs_core.grid.grid import Grid

from .nodes import Directory
from .operations import FsError

log = logging.getLogger("blackmatch.directory_views")


def _slack(bound: int) -> int:
    """How many views past the bound may come before the next eviction: a look at every view costs time in
    proportion to them all, so the next look waits until as many views again as the slack have come."""
    return max(16, bound // 4)


class DirectoryViews:
    """The views by cap string, least recently used first."""

    def __init__(self, grid: Grid, bound: int, cache_timeout: float, in_use: Callable[[Directory], bool]) -> None:
        self.grid = grid
        self.bound = bound
        self.cache_timeout = cache_timeout
        self._in_use = in_use
        self._views: OrderedDict[str, Directory] = OrderedDict()
        self._evict_at = bound + _slack(bound)

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, key: str) -> Directory:
        return self._views[key]

    def get(self, key: str) -> Directory | None:
        return self._views.get(key)

    def view(self, cap: DirectoryCap) -> Directory:
        """The directory's view, made (without a listing) if there is none, and counted as used now."""
        key = cap.to_string()
        directory = self._views.get(key)
        if directory is None:
            directory = self._views[key] = Directory(cap)
            if len(self._views) > self._evict_at:
                self._evict()
        else:
            self._views.move_to_end(key)
        return directory

    def _evict(self) -> None:
        """Let the least recently used views nothing uses go, down to the bound."""
        for key, directory in list(self._views.items())[:-1]:  # the newest is the one being handed out
            if len(self._views) <= self.bound:
                break
            if not self._in_use(directory):
                del self._views[key]
        self._evict_at = max(self.bound, len(self._views)) + _slack(self.bound)

    async def fresh(self, directory: Directory) -> Directory:
        """The directory with a listing no older than the cache timeout. A re-read that fails keeps the last
        listing (with a warning); only a directory never read fails, with EIO."""
        if directory.key in self._views:
            self._views.move_to_end(directory.key)
        if directory.stale(self.cache_timeout):
            async with directory.refresh_lock:
                if directory.stale(self.cache_timeout):
                    version = directory.listing_version
                    try:
                        listing = await read_directory(self.grid, directory.cap)
                    except LafsError as exc:
                        if directory.listing is None:
                            raise FsError(errno.EIO, f"cannot read directory: {exc}") from None
                        log.warning("directory re-read failed, using the last listing: %s", exc)
                        directory.fetched_at = time.monotonic()
                    else:
                        # A publish that landed during the read left a newer listing (and dropped the pending
                        # names it holds): the read's older one would hide them.
                        if directory.listing_version == version:
                            directory.set_listing(listing)
                            directory.reads += 1
        return directory
