"""The server's picture of the tree: inodes, and directories with their grid listing and pending changes.

A directory's view is its listing as last read from the grid, overlaid by its pending changes (write_back.py):
names whose change (a new or rewritten entry, or a removal) is not on the grid yet. Pending changes are published in
batches, one directory update for many names; the listing is re-read when older than the cache timeout, so changes
made elsewhere show.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import trio

from lafs_core.caps import Cap, DirectoryCap
from lafs_core.dirnode import DirEntry

from .journal_records import Change, Removal
from .local_files import LocalFile

DIRECTORY, FILE, SYMLINK = "dir", "file", "symlink"
# A FIFO, socket or device: an entry whose kind and device numbers live in the metadata (metadata.py), with an
# empty LIT cap. The kernel serves opens of these itself; no content of theirs is ever read or written here.
SPECIAL = "special"
# An entry linking its own directory or one of that directory's ancestors (Tahoe allows such loops): the kernel
# refuses a directory inode found below itself, and the tree below it would be endless, so it is shown as a
# symlink to the ancestor.
LOOP = "loop"


@dataclass(eq=False)
class Inode:
    """A file, directory, symlink or special file as the kernel knows it, linked at its names or detached.

    A file with several names (a hard link) is one inode: `names` holds each (directory, name) this server knows
    it by, the first being the one its path is shown by; a directory or a file with one name has at most one."""

    number: int
    kind: str
    cap: Cap | None  # on the grid (for a file being written: the version it started from)
    metadata: dict[str, Any]
    names: list[tuple[Directory, str]] = field(default_factory=list)
    local: LocalFile | None = None
    lookups: int = 0
    opens: int = 0
    directory: Directory | None = None  # for directories: their state
    written_ns: int | None = None  # time of a write not yet folded into `metadata` (keeps writes cheap)
    local_seen: int = 0  # the parent's `reads` when `local` was made
    loop_target: str | None = None  # for a loop: the relative path to the directory it links ("." or "../..")

    @property
    def parent(self) -> Directory | None:
        return self.names[0][0] if self.names else None

    @property
    def name(self) -> str:
        return self.names[0][1] if self.names else ""


@dataclass(eq=False)
class Directory:
    cap: DirectoryCap
    key: str = field(init=False)  # the cap as a string: how journal records and the write-back core name it
    listing: dict[str, DirEntry] | None = None
    fetched_at: float = 0.0
    listing_version: int = 0  # bumped whenever `listing` is replaced (by a re-read or by our own publish)
    reads: int = 0  # re-reads from the grid, which may bring other writers' new versions of its mutable files
    inodes: dict[str, Inode] = field(default_factory=dict)  # live inodes linked here, by name (every pending link's)
    inode: Inode | None = None  # this directory's own inode, when known
    refresh_lock: trio.Lock = field(default_factory=trio.Lock)

    def __post_init__(self) -> None:
        self.key = self.cap.to_string()

    @cached_property
    def readonly_cap(self) -> DirectoryCap:
        """The read-only form of its cap, which names the same directory (deriving it costs a hash)."""
        return self.cap.readonly()

    def set_listing(self, listing: dict[str, DirEntry]) -> None:
        self.listing, self.fetched_at = listing, time.monotonic()
        self.listing_version += 1

    def stale(self, timeout: float) -> bool:
        return self.listing is None or time.monotonic() - self.fetched_at > timeout

    def names(self, pending: Mapping[str, Change]) -> list[str]:
        """Every name in the view with these pending changes, sorted."""
        assert self.listing is not None
        names = set(self.listing)
        for name, change in pending.items():
            if isinstance(change, Removal):
                names.discard(name)
            else:
                names.add(name)
        return sorted(names)

    def has(self, name: str, pending: Mapping[str, Change]) -> bool:
        if name in pending:
            return not isinstance(pending[name], Removal)
        return self.listing is not None and name in self.listing
