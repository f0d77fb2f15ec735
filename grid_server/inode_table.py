"""The numbers the kernel holds: inodes (with the local copies that hold their new content) and open handles.

Numbers start at the run's first number (node_state.py: `run << 32`), so a number from an earlier run of the
server is never handed out again: an old inode is ESTALE (the kernel looks the path up again) and an old handle
EIO (the file is to be opened again). When an inode may go (no lookups, no opens, nothing to publish or upload)
is the filesystem's policy; this table keeps the records and their counts.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lafs_core.caps import Cap

from .local_files import LocalFile
from .metadata import link_identity
from .nodes import Inode
from .operations import ROOT_INODE, FsError


class InodeTable:
    def __init__(self, first_number: int, root: Inode) -> None:
        assert root.number == ROOT_INODE
        self._inodes: dict[int, Inode] = {ROOT_INODE: root}
        self._next = max(first_number, ROOT_INODE + 1)
        self._owners: dict[str, set[Inode]] = {}  # local copies by id, and the inodes whose content each holds
        self._linked: dict[str, Inode] = {}  # hard-linked files by link identity: every name finds the one inode
        self._link_of: dict[int, str] = {}  # the identity each inode in `_linked` is filed under, by number

    def __contains__(self, number: int) -> bool:
        return number in self._inodes

    def __iter__(self) -> Iterator[Inode]:
        return iter(list(self._inodes.values()))

    def __getitem__(self, number: int) -> Inode:
        """The inode the kernel names; ESTALE when it is not known (let go, or from an earlier run)."""
        inode = self._inodes.get(number)
        if inode is None:
            raise FsError(errno.ESTALE, f"inode {number} is not known")
        return inode

    def get(self, number: int) -> Inode | None:
        return self._inodes.get(number)

    def holds(self, inode: Inode) -> bool:
        """Whether this very inode is in the table (not another one with its number)."""
        return self._inodes.get(inode.number) is inode

    def add(self, kind: str, cap: Cap | None, metadata: dict[str, Any]) -> Inode:
        inode = Inode(self._next, kind, cap, metadata)
        self._next += 1
        self._inodes[inode.number] = inode
        self.index_link(inode)
        return inode

    def remove(self, inode: Inode) -> None:
        if self.holds(inode):
            del self._inodes[inode.number]
        self._unindex_link(inode)

    # --- hard links -------------------------------------------------------------------------------------
    def index_link(self, inode: Inode) -> None:
        """File the inode under the link identity its metadata now carries, if any (call after it changes)."""
        self._unindex_link(inode)
        identity = link_identity(inode.metadata)
        if identity is not None and self.holds(inode):
            self._linked[identity] = inode
            self._link_of[inode.number] = identity

    def _unindex_link(self, inode: Inode) -> None:
        identity = self._link_of.pop(inode.number, None)
        if identity is not None and self._linked.get(identity) is inode:
            del self._linked[identity]

    def linked(self, identity: str) -> Inode | None:
        """The inode of the hard-linked file with this identity, if one is in the table and still carries it."""
        inode = self._linked.get(identity)
        if inode is None or not self.holds(inode) or link_identity(inode.metadata) != identity:
            return None
        return inode

    # --- local copies -----------------------------------------------------------------------------------
    def give_local(self, inode: Inode, local: LocalFile) -> None:
        """The inode's content is now `local` (shared by the inodes of one file's other names)."""
        inode.local = local
        self._owners.setdefault(local.id, set()).add(inode)

    def take_local(self, inode: Inode) -> LocalFile | None:
        """Take the inode's local copy from it; the copy, if that inode was its last owner (to be removed)."""
        local = inode.local
        assert local is not None
        inode.local = None
        owners = self._owners.get(local.id, set())
        owners.discard(inode)
        if owners:
            return None
        self._owners.pop(local.id, None)
        return local

    def owners(self, file_id: str) -> set[Inode]:
        return self._owners.get(file_id, set())

    def local_file(self, file_id: str) -> LocalFile | None:
        owner = next(iter(self._owners.get(file_id, ())), None)
        return owner.local if owner is not None else None


@dataclass(eq=False)
class Handle:
    inode: Inode
    writable: bool
    names: list[str] | None = None  # for directory handles: the listing as it was at opendir


class HandleTable:
    def __init__(self, first_number: int) -> None:
        self._first_number = first_number
        self._next = max(first_number, 1)
        self._handles: dict[int, Handle] = {}

    def open(self, inode: Inode, writable: bool, names: list[str] | None = None) -> int:
        fh = self._next
        self._next += 1
        self._handles[fh] = Handle(inode, writable, names)
        inode.opens += 1
        return fh

    def __getitem__(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise self._unknown(fh)
        return handle

    def close(self, fh: int) -> Handle:
        handle = self._handles.pop(fh, None)
        if handle is None:
            raise self._unknown(fh)
        handle.inode.opens -= 1
        return handle

    def _unknown(self, fh: int) -> FsError:
        """EIO for a handle an earlier run of the server gave out (the file is to be opened again), else EBADF."""
        if fh < self._first_number:
            return FsError(errno.EIO, "the file was opened before the grid server started again; open it again")
        return FsError(errno.EBADF)
