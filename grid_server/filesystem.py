"""GridFilesystem: the filesystem operations (grid_server/operations.py) over a Tahoe grid.

Files are immutable CHK (LIT up to 55 bytes): a file opened for writing is copied into a local file, written
there, and on its last close uploaded in the background as a new immutable file whose cap replaces the entry.
Directory changes (create, write, rename, unlink, attribute changes) become pending entries of their directory,
recorded in the write-back journal before the call returns, and published in batches: one directory update for
many changes, re-applied on top of whatever another writer did meanwhile. `fsync` waits until the file and its
entry are on the grid. Mutable files keep their cap: a write publishes a new version of them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from lafs_core.caps import (
    Cap,
    ChkCap,
    DirectoryCap,
    LiteralCap,
    MutableReadCap,
    MutableWriteCap,
    UnknownCap,
    parse_cap,
)
from lafs_core.dirnode import child_entry, update_metadata
from lafs_core.errors import LafsError
from lafs_core.grid.directory import (
    Children,
    DirectoryError,
    create_directory,
    modify_directory,
)
from lafs_core.grid.download import ImmutableFile
from lafs_core.grid.grid import Grid, gather_per_server
from lafs_core.grid.mutable_io import create_mutable, retrieve
from lafs_core.grid.nodedir import LeaseRenewalConfig, NodeDirectory
from lafs_core.grid.server_api import StorageServer
from lafs_core.immutable.params import LIT_THRESHOLD

from .directory_views import DirectoryViews
from .inode_table import HandleTable, InodeTable
from .journal import WriteJournal
from .journal_records import Change, Link, LinkSweep, LinkSwept, Record, Removal, Together
from .lease_renewal import LeaseRenewal
from .link_sweep import WALK_DESCRIPTION, LinkSweeper
from .local_files import LocalFile, LocalFiles
from .metadata import (
    DEVICE_TYPES,
    SPECIAL_TYPES,
    PosixFields,
    entry_type,
    link_identity,
    posix_fields,
    with_posix_fields,
)
from .names import NAME_MAX, showable, too_long
from .node_state import NodeState, open_node_state
from .nodes import DIRECTORY, FILE, LOOP, SPECIAL, SYMLINK, Directory, Inode
from .operations import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INODE,
    XATTR_CREATE,
    XATTR_NAMESPACE,
    XATTR_REPLACE,
    AttrChanges,
    Attributes,
    Caller,
    DirectoryEntry,
    FsError,
    FsStats,
)
from .publisher import Publisher
from .read_cache import ReadCache
from .root_entry import load_root_metadata, save_root_metadata
from .stale_links import StaleLinks
from .uploader import Uploader
from .write_back import WriteBack

log = logging.getLogger("blackmatch.filesystem")

CAP_XATTR, READCAP_XATTR = "user.tahoe.cap", "user.tahoe.readcap"
# What `blackmatch flush` reads on any path of the mount (through FUSE, so the same in both modes): FLUSH_XATTR has
# every pending change tried now and answers how far the queue is, QUEUE_XATTR only answers. Neither is listed.
FLUSH_XATTR, QUEUE_XATTR = "user.blackmatch.flush", "user.blackmatch.queue"
FLUSH_FAILURES_SHOWN = 3  # failing items a flush answer names (it must stay far below the 64 KiB xattr limit)
FLUSH_ERROR_CHARS = 300
READDIR_BATCH = 512
DRAIN_CHECK = 1.0  # seconds between a drain's looks at whether anything moved
DRAIN_GIVE_UP = 120.0  # seconds a drain waits while nothing moves (the grid is unreachable) before it gives up
DRAIN_AGAIN = 10.0  # what a drain waits instead when an earlier one gave up and nothing has moved since
BLOCK = 4096


@contextmanager
def local_disk(what: str) -> Iterator[None]:
    """The node directory's disk failing (full, above all) as the caller's error, with its errno: a full disk is
    ENOSPC to the program that writes, not EIO, and nothing else of the mount is touched."""
    try:
        yield
    except OSError as exc:
        raise FsError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class FilesystemOptions:
    cache_timeout: float = 5.0  # directory listings older than this are re-read from the grid
    cache_size: int = 1 << 30  # bytes of downloaded file content kept on disk
    upload_workers: int = 3
    directory_views: int = 1000  # directory listings kept once nothing uses them (least recently used go first)


class GridFilesystem:
    """The Operations interface over one grid, rooted at one directory cap."""

    def __init__(
        self,
        grid: Grid,
        root: DirectoryCap,
        options: FilesystemOptions,
        state_dir: Path,
        nursery: trio.Nursery,
        read_cache: ReadCache,
        first_number: int,
        lease_renewal: LeaseRenewalConfig,
    ) -> None:
        self.grid = grid
        self.options = options
        self.readonly = root.is_readonly
        self.nursery = nursery
        self.local_files = LocalFiles(state_dir / "files")
        self.read_cache = read_cache
        self.journal = WriteJournal(state_dir / "journal")
        self.uid, self.gid = os.getuid(), os.getgid()
        self.write_back = WriteBack()
        self.publisher = Publisher(self._publish_directory, lambda key: bool(self.write_back.ready(key)))
        self.uploader = Uploader(
            grid,
            options.upload_workers,
            wanted=lambda local: local.writers == 0 and local.dirty and not self._orphaned(local),
            mutable_cap=self._mutable_cap,
            uploaded=self._uploaded,
            skipped=self._note_progress,
            find=lambda file_id: self.inodes.local_file(file_id),
        )
        self.directories = DirectoryViews(grid, options.directory_views, options.cache_timeout, self._in_use)
        root_dir = self.directories.view(root)
        self.state_dir = state_dir
        self.lease_renewal = LeaseRenewal(grid, root, state_dir, lease_renewal)
        saved = load_root_metadata(state_dir)
        self.root = Inode(ROOT_INODE, DIRECTORY, root, saved or {}, directory=root_dir, lookups=1)
        root_dir.inode = self.root
        self.inodes = InodeTable(first_number, self.root)
        if saved is None:  # first mounted now: that is its times' start (they go on from the saved ones after)
            owner = Caller(self.uid, self.gid, 0)
            self._set_fields(self.root, self._new_fields(owner, self._fields(self.root).mode, None))
            try:
                self._save_root()
            except FsError as exc:  # its times then start again at the next mount
                log.warning("%s", exc)
        self.handles = HandleTable(first_number)
        self._changed = trio.Event()
        self._done = 0  # uploads and publishes done: what a drain watches, with the grid's stored bytes
        self._gave_up_at: tuple[int, int] | None = None  # the progress mark when a drain last gave up
        self._closed_unsynced: dict[str, LocalFile] = {}  # closed files whose content is not fsynced yet
        self._closed_wanted = trio.Event()
        self.stale_links = StaleLinks()
        self.link_sweeper = LinkSweeper(
            self.stale_links,
            self.directories,
            root,
            pending_in=self._pending_in,
            visit=self._child,
            let_go=self._maybe_drop,
            swept=self._swept,
            progress=self._note_progress,
        )

    # --- start, drain, close -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._replay_journal()
        self.nursery.start_soon(self._fsync_closed_files)
        self.nursery.start_soon(self.publisher.run)
        self.nursery.start_soon(self.uploader.run)
        self.nursery.start_soon(self.lease_renewal.run)
        self.nursery.start_soon(self.link_sweeper.run)
        if len(self.stale_links):
            self.link_sweeper.want()

    async def drain(self, give_up_after: float = DRAIN_GIVE_UP) -> bool:
        """Wait until every change is on the grid; False once nothing has moved for `give_up_after` seconds (the
        journal keeps the rest for the next start). Moving is an upload or publish done, or share bytes stored:
        a long upload of a big file keeps the drain going, failed attempts against a grid that is down do not.

        A drain that starts where an earlier one gave up, nothing having moved since, waits only DRAIN_AGAIN
        seconds (a few upload retries) for something to move: the end of a mount, and then its grid server, each
        drain the same root, and a grid found down once is not waited out again by each of them."""
        self._urge()
        mark, quiet_since = self._progress_mark(), trio.current_time()
        patience = min(give_up_after, DRAIN_AGAIN) if mark == self._gave_up_at else give_up_after
        while self.outstanding():
            for key in self.write_back.directories():
                if self.write_back.ready(key) and self.publisher.retries.failures.get(key) is None:  # (retried)
                    self.publisher.want(key, urgent=True)
            changed = self._changed  # several drains may wait at once: each on the event current now
            with trio.move_on_after(DRAIN_CHECK):
                await changed.wait()
            now, current = trio.current_time(), self._progress_mark()
            if current != mark:
                mark, quiet_since, patience = current, now, give_up_after
            elif now - quiet_since >= patience:
                self._gave_up_at = current
                left = self.outstanding()
                log.warning("unmounting with %d changes still queued; they resume on the next mount", left)
                return False
        return True

    def _urge(self) -> None:
        """Have every pending change tried now: closed files uploaded, failed directory updates and link sweeps
        retried without waiting for their back-off (the grid may be back)."""
        for inode in self.inodes:
            if inode.local is not None and inode.local.dirty and inode.local.writers == 0:
                self.uploader.queue(inode.local)
        self.publisher.retries.retry_now()
        if len(self.stale_links):
            self.link_sweeper.now()

    async def _flush_progress(self) -> bytes:
        """How far the root is from having every change on the grid, as the JSON `blackmatch flush` reads:
        changes `left` (drain's count), uploads in flight, share bytes stored so far, and the first few failing
        items with their last error."""
        state = await self.queue_state()
        failing = [
            {"what": what, "item": entry["item"], "error": _shortened(str(entry["error"]), FLUSH_ERROR_CHARS)}
            for what, key in (("upload", "uploads"), ("directory update", "publishes"), ("link sweep", "link_sweeps"))
            for entry in state[key]["failing"]
        ]
        progress = {
            "left": self.outstanding(),
            "uploading": self.uploader.in_flight(),
            "stored_bytes": self.grid.stored_bytes,
            "failing": failing[:FLUSH_FAILURES_SHOWN],
        }
        return json.dumps(progress).encode()

    async def queue_state(self) -> dict[str, Any]:
        """What the write-back queue holds: changes pending, uploads and publishes waiting, in flight, or failing
        (why, how often, and in how many seconds they are tried again), and hard-linked files whose other names are
        still to be brought up to date (link_sweep.py); and where the background lease renewal stands."""
        now = trio.current_time()
        ready = [key for key in self.write_back.directories() if self.write_back.ready(key)]
        upload_failures, publish_failures = self.uploader.retries.failures, self.publisher.retries.failures
        sweep_failures = self.link_sweeper.retries.failures
        return {
            "changes": self.write_back.count(),
            "uploads": {
                "waiting": self.uploader.waiting(),
                "in_flight": self.uploader.in_flight(),
                "failing": [
                    upload_failures.describe(file_id, self._local_file_name(file_id), now)
                    for file_id in upload_failures.failing()
                ],
            },
            "publishes": {
                "waiting": self.publisher.waiting(ready),
                "in_flight": self.publisher.in_flight(),
                "failing": [
                    publish_failures.describe(key, self._path(self.directories[key].inode), now)
                    for key in publish_failures.failing()
                ],
            },
            "link_sweeps": {
                "pending": len(self.stale_links),
                "failing": [sweep_failures.describe(key, WALK_DESCRIPTION, now) for key in sweep_failures.failing()],
            },
            "lease_renewal": self.lease_renewal.state(),
        }

    def _local_file_name(self, file_id: str) -> str:
        """A failing upload as its user knows it: the path of a name it has (else the local file's id)."""
        owners = sorted(self.inodes.owners(file_id), key=lambda inode: inode.parent is None)
        return self._path(owners[0]) if owners and owners[0].parent is not None else f"(local file {file_id})"

    def _path(self, inode: Inode | None) -> str:
        """The inode's path below the root as last looked up ("…/name" where an ancestor is not known)."""
        parts: list[str] = []
        while inode is not None and inode is not self.root and len(parts) < 256:
            parts.append(inode.name)
            parent = inode.parent
            inode = parent.inode if parent is not None else None
        return "/" + "/".join(reversed(parts)) if inode is self.root else "…/" + "/".join(reversed(parts))

    async def finish_uploads(self, give_up_after: float | None) -> int:
        """A drain (giving up after `give_up_after` seconds without progress, if that is less than the drain's
        own); how many changes stay queued. The end of a mount waits on it, so that unmount can say what is left."""
        await self.drain(DRAIN_GIVE_UP if give_up_after is None else min(give_up_after, DRAIN_GIVE_UP))
        return self.outstanding()

    def _progress_mark(self) -> tuple[int, int]:
        return self._done, self.grid.stored_bytes

    def _note_progress(self) -> None:
        """Count a piece of work done and wake every drain waiting now; later ones wait for the next."""
        self._done += 1
        self._changed.set()
        self._changed = trio.Event()

    def outstanding(self) -> int:
        return self.write_back.count() + self.uploader.waiting() + len(self.stale_links)

    def check(self) -> None:
        """Raise AssertionError unless the write-back state is consistent, in itself and with the inodes: every
        pending link's inode is linked at its name, and every link waiting for content has that local file; and
        no view an inode uses was let go."""
        self.write_back.check()
        for inode in self.inodes:
            for view in (inode.directory, inode.parent):
                assert view is None or self.directories.get(view.key) is view, f"inode {inode.number}: view let go"
            for directory, name in inode.names:
                assert directory.inodes.get(name) is inode, f"inode {inode.number} is not at its name {name}"
                assert self.directories.get(directory.key) is directory, f"inode {inode.number}: view let go"
        for key in self.write_back.directories():
            directory = self.directories[key]
            for name, change in self.write_back.pending_in(key).items():
                if isinstance(change, Link):
                    linked = directory.inodes.get(name)
                    assert linked is not None and (directory, name) in linked.names, change
                    assert self.inodes.holds(linked), f"the inode of {change} is not in the table"
                    if change.local is not None:
                        assert linked.local is not None and linked.local.id == change.local, change

    def close(self) -> None:
        self.journal.close()
        for inode in self.inodes:
            if inode.local is not None:
                inode.local.close()

    # --- inodes and directories --------------------------------------------------------------------------
    def _in_use(self, directory: Directory) -> bool:
        """Whether the view must stay: its listing is being read, it has changes to publish (or failed to), or an
        inode refers to it (its own, or one linked in it), which the kernel may still ask about."""
        key = directory.key
        return (
            bool(directory.inodes)
            or (directory.inode is not None and self.inodes.holds(directory.inode))
            or bool(self.write_back.pending_in(key))
            or self.publisher.busy(key)
            or directory.refresh_lock.locked()
        )

    def _new_inode(self, kind: str, cap: Cap | None, metadata: dict[str, Any]) -> Inode:
        inode = self.inodes.add(kind, cap, metadata)
        if kind == DIRECTORY:
            assert isinstance(cap, DirectoryCap)
            inode.directory = self.directories.view(cap)
            inode.directory.inode = inode
        return inode

    def _dir_of(self, number: int) -> Directory:
        inode = self.inodes[number]
        if inode.directory is None:
            raise FsError(errno.ENOTDIR, "not a directory")
        return inode.directory

    @staticmethod
    def _kind_of(cap: Cap, metadata: dict[str, Any]) -> str:
        file_type = entry_type(cap, metadata)
        return {stat.S_IFDIR: DIRECTORY, stat.S_IFLNK: SYMLINK, stat.S_IFREG: FILE}.get(file_type, SPECIAL)

    @staticmethod
    def _levels_up_to(directory: Directory, cap: DirectoryCap) -> int | None:
        """How many levels above `directory` the directory `cap` names is (0: `directory` itself), or None when it
        is none of its ancestors. Ancestors are followed along each directory's inode: a directory linked at
        several places is known at the last one looked up."""
        wanted = cap.readonly()
        seen: set[int] = set()  # a path that somehow led back into itself must end the walk, not hang the server
        current: Directory | None = directory
        levels = 0
        while current is not None and id(current) not in seen:
            if current.readonly_cap == wanted:
                return levels
            seen.add(id(current))
            current = current.inode.parent if current.inode is not None else None
            levels += 1
        return None

    def _pending_in(self, directory: Directory) -> Mapping[str, Change]:
        return self.write_back.pending_in(directory.key)

    def _pending_link(self, directory: Directory, name: str) -> Inode | None:
        """The inode whose link at `name` is pending in the directory, if that is the name's pending change."""
        return directory.inodes.get(name) if isinstance(self.write_back.change(directory.key, name), Link) else None

    def _entry_pending(self, inode: Inode) -> bool:
        """Whether an entry of the inode (any of its names) is still to be published."""
        return any(self._pending_link(directory, name) is inode for directory, name in inode.names)

    @staticmethod
    def _on_grid(inode: Inode, directory: Directory, name: str) -> bool:
        """Whether the directory's listing already links `name` to the inode's cap (the grid has that entry)."""
        entry = directory.listing.get(name) if directory.listing is not None else None
        return entry is not None and inode.cap is not None and entry.cap.to_string() == inode.cap.to_string()

    def _child(self, directory: Directory, name: str) -> Inode | None:
        """The inode linked at `name` in the directory's view (made from the listing if new), or None."""
        change = self.write_back.change(directory.key, name)
        if change is not None:
            return None if isinstance(change, Removal) else directory.inodes[name]
        assert directory.listing is not None
        entry = directory.listing.get(name)
        if entry is None:
            return None
        cap = entry.cap
        kind, loop_target = self._kind_of(cap, entry.metadata), None
        if isinstance(cap, DirectoryCap) and (levels := self._levels_up_to(directory, cap)) is not None:
            kind, loop_target = LOOP, "/".join([".."] * levels) or "."
        inode = directory.inodes.get(name)
        settled = inode is not None and inode.opens == 0 and self._settled(inode)
        if (
            inode is not None
            and settled
            and (
                inode.cap is None
                or inode.cap.to_string() != cap.to_string()
                or (inode.kind, inode.loop_target) != (kind, loop_target)
            )
        ):
            self._detach(inode, directory, name)  # replaced elsewhere, or a loop made or broken: a new inode for it
            inode = None
        missed = self.stale_links.stale(cap, entry.metadata)  # a change of its hard-linked file passed it by
        if inode is None and kind not in (DIRECTORY, LOOP):
            inode = self._join_link(directory, name, cap, entry.metadata, missed is not None)
        if inode is None:
            inode = self._new_inode(kind, cap, dict(entry.metadata))
            inode.loop_target = loop_target
            self._attach(inode, directory, name)
        elif missed is None and inode.local is None:
            inode.metadata = dict(entry.metadata)
            self.inodes.index_link(inode)
        elif (
            missed is None
            and settled
            and isinstance(cap, MutableWriteCap | MutableReadCap)
            and inode.local_seen != directory.reads
        ):
            # A mutable file's copy is a cache of the version read then: after a re-read, read it again.
            self._release_local(inode)
            inode.metadata = dict(entry.metadata)
        if missed is not None:
            self._bring_up_to_date(inode, directory, name, missed)
        return inode

    def _join_link(
        self, directory: Directory, name: str, cap: Cap, metadata: dict[str, Any], missed: bool
    ) -> Inode | None:
        """The inode another name of this hard-linked file has in the table, now known at `name` too; None when
        there is none, or when the entry holds other content than it (rewritten by a client that keeps no links).

        An entry that `missed` a change of the file (stale_links.py: it holds the cap from before the first write
        through another name, say) joins it, to be brought up to date (`_child`); a mutable file made by another
        mount replaces the immutable content of an inode that holds nothing of its own."""
        identity = link_identity(metadata)
        inode = self.inodes.linked(identity) if identity is not None else None
        if inode is None:
            return None
        self._attach(inode, directory, name)
        same = inode.cap is not None and inode.cap.to_string() == cap.to_string()
        if same or missed:
            return inode
        inode_mutable, entry_mutable = (isinstance(c, MutableWriteCap | MutableReadCap) for c in (inode.cap, cap))
        if entry_mutable and not inode_mutable and self._settled(inode):
            if inode.local is not None:
                self._release_local(inode)
            inode.cap, inode.metadata = cap, dict(metadata)
            self._touch(inode)  # the other names known here still hold the content from before the first write
        else:
            self._unname(inode, directory, name)
            return None
        return inode

    def _bring_up_to_date(self, inode: Inode, directory: Directory, name: str, missed: LinkSweep) -> None:
        """Give `name`, whose entry missed a change of its hard-linked file, the file's state: the state of the
        inode it joined, or (an inode made from entries that missed the change too) the state the change left, as
        its sweep recorded it, for all its names. Entries are re-recorded as known names are after a change."""
        if self.stale_links.stale(inode.cap, inode.metadata) is None:
            self._touch(inode, [(directory, name)])
            return
        if not self._settled(inode):
            return  # written meanwhile from the old content: its own upload and entries decide
        before = inode.cap, inode.metadata
        if inode.local is not None:
            self._release_local(inode)  # a copy of the old content
        inode.cap, inode.metadata = parse_cap(missed.cap), dict(missed.metadata)
        self.inodes.index_link(inode)
        try:
            self._touch(inode)
        except FsError:  # not recorded (a full disk): the inode shows what the grid has, and a later lookup retries
            inode.cap, inode.metadata = before
            self.inodes.index_link(inode)
            raise

    def _missed_names_sweep(
        self, inode: Inode, identity: str | None, known: int, replaced: tuple[Cap, ...]
    ) -> LinkSweep | None:
        """The sweep (stale_links.py) a change of the hard-linked file `identity` needs when it re-records only
        `known` names and the file has more: the others are to be found and given the change. `replaced` are the
        caps the change took from the names (the first write's immutable one)."""
        if identity is None or inode.cap is None or known >= self._file_links(inode, self._fields(inode)):
            return None
        replaced_caps = [cap.to_string() for cap in replaced]
        return self.stale_links.new_sweep(identity, replaced_caps, inode.cap.to_string(), self._folded_metadata(inode))

    def _swept(self, sweeps: list[LinkSweep]) -> None:
        """These sweeps found their names: journal that, so that a restart does not walk for them again."""
        for sweep in sweeps:
            done = LinkSwept(sweep.identity)
            self._record_progress(done)
            self.stale_links.apply(done)
        self._maybe_compact()

    def _settled(self, inode: Inode) -> bool:
        """Whether the inode's local copy, if any, holds nothing the grid lacks or nothing anyone can reach any more
        (so it may be dropped)."""
        local = inode.local
        if local is None:
            return True
        if local.writers:
            return False
        return (not local.dirty and not self.uploader.queued(local.id)) or self._orphaned(local)

    def _orphaned(self, local: LocalFile) -> bool:
        """Whether every name of this new content is gone (unlinked, or renamed over): an upload of it would never
        be read, so none is made, and its disk space comes back once the last handle and lookup go. Temporary
        files, editors' swap files and the like then cost no upload. A mutable file's content is never orphaned:
        it is published to its cap, which other entries, mounts or clients may hold."""
        owners = self.inodes.owners(local.id)
        return not any(owner.names or isinstance(owner.cap, MutableWriteCap) for owner in owners)

    def _attach(self, inode: Inode, directory: Directory, name: str) -> None:
        """Know the inode by `name` in `directory` too (a rename takes the old name away with `_unname`)."""
        if (directory, name) not in inode.names:
            inode.names.append((directory, name))
        directory.inodes[name] = inode

    def _unname(self, inode: Inode, directory: Directory, name: str) -> None:
        if (directory, name) in inode.names:
            inode.names.remove((directory, name))
        if directory.inodes.get(name) is inode:
            del directory.inodes[name]

    def _detach(self, inode: Inode, directory: Directory, name: str) -> None:
        """The inode is no longer at `name` (its other names, if any, stay); let it go if nothing holds it."""
        self._unname(inode, directory, name)
        self._maybe_drop(inode)

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.lookups > 0 or inode.opens > 0 or inode.number == ROOT_INODE:
            return
        if self._entry_pending(inode):
            return  # its entry is still to be published
        if not self._settled(inode):
            return
        for directory, name in list(inode.names):
            self._unname(inode, directory, name)
        self.inodes.remove(inode)
        if inode.local is not None:
            self._release_local(inode)

    def _release_local(self, inode: Inode) -> None:
        local = self.inodes.take_local(inode)
        if local is not None:  # its last owner: nothing left to upload
            self.uploader.forget(local.id)
            local.remove()

    # --- attributes ---------------------------------------------------------------------------------------
    def _fields(self, inode: Inode) -> PosixFields:
        writable = not self.readonly and self._replaceable(inode.cap)
        is_dir = inode.kind in (DIRECTORY, LOOP)  # a loop's entry keeps a directory's fields for when it is not one
        fields = posix_fields(inode.metadata, is_dir=is_dir, writable=writable, uid=self.uid, gid=self.gid)
        if inode.kind != SPECIAL:  # an entry flagged special that got content (entry_type): the flag goes with it
            fields.special, fields.rdev = 0, 0
        if inode.written_ns is not None:
            fields.mtime_ns = fields.ctime_ns = inode.written_ns
        return fields

    def _set_fields(self, inode: Inode, fields: PosixFields) -> None:
        inode.metadata = with_posix_fields(inode.metadata, fields)
        inode.written_ns = None  # folded into the metadata
        self.inodes.index_link(inode)

    @staticmethod
    def _file_links(inode: Inode, fields: PosixFields) -> int:
        """st_nlink of a file, symlink or other non-directory: the count of names its entries keep, or the names
        this server knows it by if more. The count is what the last blackmatch mount that added or removed a name
        recorded (in the names it knew of, and by a sweep in the others): names another client adds or removes,
        and a link made while some names were not known, leave it stale in some names (README, Limits)."""
        return max(fields.link_count, len(inode.names)) if fields.link_id is not None else 1

    def _change_fields(
        self, inode: Inode, fields: PosixFields, names: list[tuple[Directory, str]] | None = None, sweep: bool = True
    ) -> None:
        """Set the inode's fields and record the change at its names (`_touch`; a rename and a link give the names
        it has after them); one that cannot be recorded is not made. The names of a hard-linked file this mount
        does not know get the change from a sweep, unless `sweep` is False (a new link, which must stay cheap)."""
        before = inode.metadata, inode.written_ns
        identity = link_identity(inode.metadata)
        self._set_fields(inode, fields)
        try:
            self._touch(inode, names, sweep_for=identity if sweep else None)
        except FsError:
            inode.metadata, inode.written_ns = before
            raise

    def _folded_metadata(self, inode: Inode) -> dict[str, Any]:
        """The inode's metadata with the time of its last write in it (writes only note that time)."""
        if inode.written_ns is not None:
            self._set_fields(inode, self._fields(inode))
        return inode.metadata

    async def _size(self, inode: Inode) -> int:
        if inode.local is not None:
            return inode.local.size
        if inode.loop_target is not None:
            return len(inode.loop_target)
        cap = inode.cap
        if isinstance(cap, LiteralCap):
            return len(cap.data)
        if isinstance(cap, ChkCap):
            return cap.size
        if isinstance(cap, MutableWriteCap | MutableReadCap):
            await self._materialize(inode)
            assert inode.local is not None
            return inode.local.size
        return BLOCK if inode.kind == DIRECTORY else 0

    def _nlink(self, inode: Inode, fields: PosixFields) -> int | None:
        """st_nlink: 0 once the inode has no name (an open file unlinked or renamed over, a removed directory);
        for a directory 2 plus its subdirectories, counted from its listing and pending changes, or None while its
        listing has not been read (reading it for a stat would cost a grid read for each directory `ls -l`
        shows); for anything else its number of names (`_file_links`)."""
        if inode.parent is None and inode is not self.root:
            return 0
        if inode.kind != DIRECTORY:
            return self._file_links(inode, fields)
        directory = inode.directory
        assert directory is not None
        if directory.listing is None:
            return None
        pending = self._pending_in(directory)
        listed = [entry.cap for name, entry in directory.listing.items() if name not in pending]
        linked = [change.kind for change in pending.values() if isinstance(change, Link)]
        return 2 + sum(isinstance(cap, DirectoryCap) for cap in listed) + linked.count(DIRECTORY)

    async def _attributes(self, inode: Inode) -> Attributes:
        fields = self._fields(inode)
        size = await self._size(inode)
        timeout = min(1.0, self.options.cache_timeout)
        nlink = self._nlink(inode, fields)
        file_type = {
            LOOP: stat.S_IFLNK,
            DIRECTORY: stat.S_IFDIR,
            SYMLINK: stat.S_IFLNK,
            SPECIAL: fields.special,
        }.get(inode.kind, stat.S_IFREG)
        return Attributes(
            inode=inode.number,
            mode=file_type | (0o777 if inode.kind == LOOP else fields.mode),
            # A count not known yet shows as 1 ("unknown" to find and the like), and the kernel is to ask again at
            # the next stat, by when the directory has usually been read (listed, or a name in it looked up).
            nlink=1 if nlink is None else nlink,
            rdev=fields.rdev,
            uid=fields.uid,
            gid=fields.gid,
            size=size,
            atime_ns=fields.atime_ns,
            mtime_ns=fields.mtime_ns,
            ctime_ns=fields.ctime_ns,
            attr_timeout=timeout if nlink is not None else 0.0,
            entry_timeout=timeout,
        )

    @staticmethod
    def _replaceable(cap: Cap | None) -> bool:
        """Whether writing may change this object. Immutable files are always rewritable (the entry gets a new
        cap); a mutable file or directory needs its write cap."""
        if isinstance(cap, DirectoryCap | MutableReadCap | UnknownCap):
            return not cap.is_readonly if isinstance(cap, DirectoryCap) else False
        return True

    def _check_writable(self, directory: Directory | None = None) -> None:
        if self.readonly:
            raise FsError(errno.EROFS, "the mount is read-only")
        if directory is not None and directory.cap.is_readonly:
            raise FsError(errno.EACCES, "the directory is read-only")

    @staticmethod
    def _check_length(name: str) -> None:
        """ENAMETOOLONG for a name longer than NAME_MAX bytes, from every call that takes a name, as on tmpfs."""
        if too_long(name):
            raise FsError(errno.ENAMETOOLONG, f"a name is at most {NAME_MAX} bytes long")

    @classmethod
    def _check_new_name(cls, name: str) -> None:
        """A name an entry can be created with: one the mount can show."""
        cls._check_length(name)
        if not showable(name):
            raise FsError(errno.EINVAL, f"{name!r} cannot name an entry")

    # --- pending changes and the journal --------------------------------------------------------------------
    def _record_link(self, directory: Directory, name: str, inode: Inode) -> None:
        """Record that `name` in `directory` is to become `inode`, journal first: if the journal cannot take the
        record (a full disk), the change is refused and nothing of it is made."""
        change = self._new_link(directory, name, inode)
        self._record_change(change)
        self._linked(directory, name, inode, change)

    def _new_link(self, directory: Directory, name: str, inode: Inode) -> Link:
        """The record of linking `inode` at `name` in `directory`, not yet journaled."""
        local = inode.local.id if inode.local is not None and inode.local.dirty else None
        cap = inode.cap.to_string() if inode.cap is not None else None
        metadata = self._folded_metadata(inode)
        return self.write_back.new_link(directory.key, name, inode.kind, metadata, cap, local)

    def _linked(self, directory: Directory, name: str, inode: Inode, change: Link) -> None:
        """Show a journaled link in the view, and publish it once it waits for no upload."""
        self._attach(inode, directory, name)
        if change.local is None:
            self.publisher.want(directory.key)

    def _record_removal(self, directory: Directory, name: str) -> None:
        """Record that `name` in `directory` is to go, journal first, as `_record_link`."""
        self._record_change(self.write_back.new_removal(directory.key, name))
        self.publisher.want(directory.key)

    def _record_change(self, *changes: Change, sweep: LinkSweep | None = None) -> None:
        """Journal changes (and the sweep that is to carry them to names not known), then make them pending.
        Several go as one `Together` record: after a crash, a replay finds all of them or none."""
        record: Record = Together(changes, sweep)
        if not changes and sweep is not None:
            record = sweep
        elif len(changes) == 1 and sweep is None:
            record = changes[0]
        with local_disk("cannot record the change"):
            self.journal.append(record)
        for change in changes:
            self.write_back.apply(change)
        if sweep is not None:
            self.stale_links.apply(sweep)
            self.link_sweeper.want()

    def _enter_new(self, directory: Directory, name: str, inode: Inode) -> None:
        """Give a new inode its entry. One that cannot be recorded (a full disk) lets the inode and its local copy
        go again, so a refused create, mkdir, symlink or link leaves nothing behind."""
        try:
            self._record_link(directory, name, inode)
        except FsError:
            self._abandon(inode)
            raise
        self._entries_changed(directory)

    def _abandon(self, inode: Inode) -> None:
        """Let go of a new inode that never got its entry, and of its local copy."""
        self.inodes.remove(inode)
        if inode.local is not None:
            self._release_local(inode)

    def _touch(
        self,
        inode: Inode,
        names: list[tuple[Directory, str]] | None = None,
        sweep_for: str | None = None,
        replaced: tuple[Cap, ...] = (),
    ) -> None:
        """Re-record the inode's entries (at `names`, default all it is known by) after its content or attributes
        changed: every name of a hard-linked file shows them, and those of its names this mount does not know get
        them from a sweep, recorded with them, when `sweep_for` is the file's link identity (before the change;
        `replaced`: caps the change took from the names). Names in read-only directories (or on a read-only
        mount) cannot change, and keep what they have. The root, which has no entry, keeps its metadata in its
        state directory."""
        if self.readonly:
            return
        if inode is self.root:
            self._save_root()
        # One journal record for all the names: after a crash, every name has the change or none has, so a
        # replay never splits the names of one file between two contents.
        known = inode.names if names is None else names
        where = [(d, n) for d, n in known if not d.cap.is_readonly]
        changes = [self._new_link(directory, name, inode) for directory, name in where]
        sweep = self._missed_names_sweep(inode, sweep_for, len(known), replaced)
        if changes or sweep is not None:
            self._record_change(*changes, sweep=sweep)
            for (directory, name), change in zip(where, changes, strict=True):
                self._linked(directory, name, inode, change)

    def _save_root(self) -> None:
        """Save the root's metadata (root_entry.py); a failure (a full disk) is an FsError."""
        with local_disk("cannot save the root's attributes"):
            save_root_metadata(self.state_dir, self._folded_metadata(self.root))

    def _entries_changed(self, *directories: Directory) -> None:
        """Names were made, removed or renamed in these directories: their mtime and ctime are now. Only the time is
        noted here (as a write notes it on a file); the directory's own entry is re-recorded once its changes are
        published (`_publish`), so a thousand creates in a directory cost one more entry update, not a thousand."""
        now = time.time_ns()
        for directory in directories:
            if directory.inode is not None:
                directory.inode.written_ns = now

    def _publish_own_entry(self, directory: Directory) -> None:
        """After a publish of the directory's changes, record its own entry with the times they gave it, if they
        are not recorded yet (see `_entries_changed`)."""
        inode = directory.inode
        if inode is None or inode.written_ns is None:
            return
        try:
            self._touch(inode)
        except FsError as exc:  # its changes are on the grid; only its times wait for the next change
            log.warning("cannot record the times of %s: %s", self._path(inode), exc)

    async def _publish_directory(self, key: str) -> None:
        """One publish of the directory's ready changes (many names in one update); raises if it fails."""
        ready = self.write_back.ready(key)
        if ready:
            await self._publish(self.directories[key], ready)
        if not self.write_back.pending_in(key):
            self._maybe_compact()

    async def _publish(self, directory: Directory, ready: dict[str, Change]) -> None:
        """Publish the ready changes in one directory update."""
        now = time.time()
        # each change with the inode it links (None: a removal), as they are now: the names may change meanwhile
        batch = {name: (change, self._pending_link(directory, name)) for name, change in ready.items()}

        def apply(children: Children) -> Children:
            for name, (change, item) in batch.items():
                if item is None:
                    children.pop(name, None)
                else:
                    # The cap the change recorded: the inode's may be newer, with content not uploaded yet (the
                    # empty mutable file a linked file's first write makes), which its own later change publishes.
                    assert isinstance(change, Link) and change.cap is not None
                    old = children.get(name)
                    metadata = update_metadata(old.metadata if old else None, self._folded_metadata(item), now)
                    children[name] = child_entry(parse_cap(change.cap), metadata)
            return children

        listing = await modify_directory(self.grid, directory.cap, apply)
        directory.set_listing(listing)
        published = self.write_back.mark_published(change for change, _item in batch.values())
        done = set(published.seqs)
        for name, (change, item) in batch.items():
            if item is not None and change.seq in done:
                item.metadata = dict(listing[name].metadata)
                self._maybe_drop(item)
        self._record_progress(published)
        self._publish_own_entry(directory)
        self._note_progress()

    def _record_progress(self, record: Record) -> None:
        """Journal that something reached the grid. Losing such a record costs work (a replay after a crash
        uploads or publishes that again; a republished entry can undo a change made to it elsewhere since), which
        is rare and small next to failing what already reached the grid, so a full disk is logged. Records use
        the journal's reserve, so this takes a full disk and the reserve spent."""
        try:
            self.journal.append(record)
        except OSError as exc:
            log.warning("cannot journal %s (it is redone after a restart): %s", type(record).__name__, exc)

    def _maybe_compact(self) -> None:
        if not self.write_back.count() and not self.uploader.waiting():
            try:
                self.journal.rewrite(self.stale_links.records())  # (sweeps keep the state they give in full)
            except OSError as exc:  # the journal as it was still replays to the same state
                log.warning("cannot compact the journal: %s", exc)

    async def _replay_journal(self) -> None:
        """Put the changes a previous run left unpublished back in the queue, with inodes for the links."""
        records = self.journal.replay()
        self.write_back.replay(records)
        self.stale_links.replay(records)
        content: dict[str, LocalFile] = {}  # one copy a local file, shared by the links (hard links) waiting for it
        for file_id in self.write_back.waiting_locals():
            local = self.local_files.existing(file_id)
            if local is None:
                lost = len(self.write_back.forget_waiting_for(file_id))
                log.warning("a queued file's content is missing from the cache; %d entries keep its old version", lost)
                continue
            local.mark_dirty()
            content[file_id] = local
        for stale in self.local_files.ids() - set(content):
            (self.local_files.directory / stale).unlink(missing_ok=True)
        for key in self.write_back.directories():
            for change in list(self.write_back.pending_in(key).values()):
                try:
                    self._replayed(change, content)
                except LafsError as exc:
                    log.warning("a queued change names a malformed cap (%s); skipped", exc)
                    self.write_back.forget(change)
        for local in content.values():
            self.uploader.queue(local)
        if self.write_back.count():
            log.info("resuming %d queued changes from the last run", self.write_back.count())

    def _replayed(self, change: Change, content: dict[str, LocalFile]) -> None:
        """Give a replayed change its directory view, and a link its inode (with its local content)."""
        directory_cap = parse_cap(change.directory)
        if not isinstance(directory_cap, DirectoryCap):
            raise LafsError("the directory of a queued change is not a directory cap")
        directory = self.directories.view(directory_cap)
        if isinstance(change, Link):
            identity = link_identity(change.metadata)
            inode = self.inodes.linked(identity) if identity is not None else None
            local = content[change.local] if change.local is not None else None
            cap = parse_cap(change.cap) if change.cap else None
            if inode is None or inode.local is not local or inode.cap != cap:
                # (not another name of a hard-linked file whose names the journal left in the same state)
                inode = self._new_inode(change.kind, cap, dict(change.metadata))
                if change.local is not None:
                    self.inodes.give_local(inode, content[change.local])
            self._attach(inode, directory, change.name)
        if self.write_back.ready(directory.key).get(change.name) == change:
            self.publisher.want(directory.key)

    # --- uploads ------------------------------------------------------------------------------------------
    async def _fsync_closed_files(self) -> None:
        """Group commit: soon after files are closed, fsync their content, the journal and the files' directory in
        a worker thread, so a power loss keeps what was closed (a killed process loses nothing anyway: it is all
        in the kernel)."""
        while True:
            await self._closed_wanted.wait()
            self._closed_wanted = trio.Event()
            batch, self._closed_unsynced = list(self._closed_unsynced.values()), {}
            # Duplicates, taken here where files are closed: the worker thread must not fsync (or race with the
            # closing of) a number this thread has meanwhile closed and the kernel handed to something else.
            open_fds = [local.fd for local in batch if local.fd >= 0] + [self.journal.fileno()]
            descriptors = [os.dup(fd) for fd in open_fds]
            await trio.to_thread.run_sync(fsync_and_close, descriptors, self.local_files.directory)

    def _mutable_cap(self, local: LocalFile) -> MutableWriteCap | None:
        """The write cap a local copy's content is published to, when it is a mutable file's."""
        return next((o.cap for o in self.inodes.owners(local.id) if isinstance(o.cap, MutableWriteCap)), None)

    def _uploaded(self, local: LocalFile, version: int, cap: Cap) -> None:
        """The content of that version is on the grid at `cap`: its owners' entries get the cap."""
        local.uploaded_version = version
        self._record_progress(self.write_back.mark_uploaded(local.id, cap.to_string()))
        for owner in self.inodes.owners(local.id):
            owner.cap = cap
            for directory, name in owner.names:
                if self._pending_link(directory, name) is owner:
                    self.publisher.want(directory.key)
        self._note_progress()

    # --- content ------------------------------------------------------------------------------------------
    async def _content(self, cap: Cap | None, sink: Callable[[bytes], Any]) -> None:
        """Feed a file cap's whole plaintext to `sink`, in order."""
        if cap is None or isinstance(cap, DirectoryCap | UnknownCap):
            return
        if isinstance(cap, LiteralCap):
            sink(cap.data)
        elif isinstance(cap, MutableWriteCap | MutableReadCap):
            data, _map, _version = await retrieve(self.grid, cap)
            sink(data)
        else:
            assert isinstance(cap, ChkCap)

            async def write(data: bytes) -> None:
                await trio.to_thread.run_sync(sink, data)

            await ImmutableFile(self.grid, cap).copy_to(write)

    async def _materialize(self, inode: Inode, truncate: bool = False) -> LocalFile:
        """Give the inode a local copy of its content (empty when truncating), to write or to read a mutable
        file."""
        if inode.local is not None:
            if truncate and inode.local.size:
                with local_disk("cannot truncate the local copy"):
                    inode.local.truncate(0)
            return inode.local
        with local_disk("cannot make a local copy of the file"):
            local = self.local_files.new()
            try:
                if not truncate:
                    await self._content(inode.cap, local.fill)
                    local.uploaded_version = local.version  # the same bytes as the grid holds
            except LafsError as exc:
                local.remove()
                raise FsError(errno.EIO, f"cannot read the file: {exc}") from None
            except BaseException:
                local.remove()
                raise
        self.inodes.give_local(inode, local)
        inode.local_seen = inode.parent.reads if inode.parent is not None else 0
        return local

    async def _writable_copy(self, inode: Inode, truncate: bool = False) -> LocalFile:
        """The local copy to write the inode's new content into. A file with several names is first made a mutable
        file (SDMF/MDMF, the grid's format) that every name then holds: its content goes there on upload, where
        every name, mount and later version sees it. Linking stays cheap (the names share the immutable cap); only
        the first write through a linked file pays for a key and the new file's first (empty) version. Until the
        content is uploaded, each name's entry waits for it and keeps its old content on the grid."""
        cap: MutableWriteCap | None = None
        if self._file_links(inode, self._fields(inode)) > 1 and not isinstance(inode.cap, MutableWriteCap):
            try:  # before anything changes: failing, it changes nothing
                cap = await create_mutable(self.grid, b"")
            except LafsError as exc:
                raise FsError(errno.EIO, f"cannot make the linked file writable through all its names: {exc}") from None
        had_copy = inode.local is not None
        local = await self._materialize(inode, truncate)
        if cap is not None:
            shared = inode.cap
            inode.cap = cap
            local.mark_dirty()  # the content is not at the new cap yet
            try:
                self._touch(
                    inode, sweep_for=link_identity(inode.metadata), replaced=() if shared is None else (shared,)
                )
            except FsError:  # not recorded (a full disk): the names keep the content they share
                inode.cap = shared
                if not had_copy:
                    self._release_local(inode)
                raise
        return local

    # --- operations: lookup and attributes -------------------------------------------------------------------
    async def lookup(self, parent: int, name: str) -> Attributes:
        self._check_length(name)
        directory = await self.directories.fresh(self._dir_of(parent))
        inode = self._child(directory, name)
        if inode is None:
            raise FsError(errno.ENOENT)
        attributes = await self._attributes(inode)
        inode.lookups += 1
        return attributes

    async def forget(self, counts: list[tuple[int, int]]) -> None:
        for number, count in counts:
            inode = self.inodes.get(number)
            if inode is not None:
                inode.lookups = max(0, inode.lookups - count)
                self._maybe_drop(inode)

    async def getattr(self, inode: int) -> Attributes:
        node = self.inodes[inode]
        if node.parent is not None and node.parent.stale(self.options.cache_timeout):
            directory = await self.directories.fresh(node.parent)
            if node.name not in self._pending_in(directory):
                self._child(directory, node.name)  # picks up a new version written elsewhere
        return await self._attributes(node)

    async def setattr(self, inode: int, changes: AttrChanges, fh: int | None) -> Attributes:
        node = self.inodes[inode]
        self._check_writable(node.parent)
        fields = self._fields(node)
        now = time.time_ns()
        if changes.size is not None:
            if node.kind != FILE:
                raise FsError(errno.EISDIR if node.kind == DIRECTORY else errno.EINVAL)
            local = await self._writable_copy(node, truncate=changes.size == 0)
            with local_disk("cannot resize the local copy"):
                local.truncate(changes.size)
            fields.mtime_ns = now
            if local.writers == 0:
                self.uploader.queue(local)
        if changes.mode is not None:
            fields.mode = changes.mode & 0o7777
        if changes.uid is not None:
            fields.uid = changes.uid
        if changes.gid is not None:
            fields.gid = changes.gid
        if changes.atime_ns is not None:
            fields.atime_ns = changes.atime_ns
        if changes.mtime_ns is not None:
            fields.mtime_ns = changes.mtime_ns
        fields.ctime_ns = now
        self._change_fields(node, fields)
        return await self._attributes(node)

    async def readlink(self, inode: int) -> str:
        node = self.inodes[inode]
        if node.loop_target is not None:
            return node.loop_target
        if node.kind != SYMLINK:
            raise FsError(errno.EINVAL)
        if node.local is not None:
            return node.local.pread(0, node.local.size).decode("utf-8", "surrogateescape")
        parts: list[bytes] = []
        try:
            await self._content(node.cap, parts.append)
        except LafsError as exc:
            raise FsError(errno.EIO, f"cannot read the link: {exc}") from None
        return b"".join(parts).decode("utf-8", "surrogateescape")

    # --- operations: names --------------------------------------------------------------------------------
    async def _new_entry_checks(self, parent: int, name: str) -> Directory:
        self._check_new_name(name)
        directory = await self.directories.fresh(self._dir_of(parent))
        self._check_writable(directory)
        if directory.has(name, self._pending_in(directory)):
            raise FsError(errno.EEXIST)
        return directory

    def _new_fields(
        self, caller: Caller, mode: int, directory: Directory | None, is_directory: bool = False
    ) -> PosixFields:
        """The fields of an entry `caller` makes in `directory`: the mode less the caller's umask, owned by the
        caller, but in the directory's group when the directory is set-group-ID (a new directory is then
        set-group-ID too), as Linux does, so that a shared directory's files stay its group's."""
        now = time.time_ns()
        fields = PosixFields(mode & 0o7777 & ~caller.umask, caller.uid, caller.gid, now, now, now)
        parent = directory.inode if directory is not None else None
        if parent is not None:
            parent_fields = self._fields(parent)
            if parent_fields.mode & stat.S_ISGID:
                fields.gid = parent_fields.gid
                if is_directory:
                    fields.mode |= stat.S_ISGID
        return fields

    async def mkdir(self, parent: int, name: str, mode: int, caller: Caller) -> Attributes:
        directory = await self._new_entry_checks(parent, name)
        try:
            cap = await create_directory(self.grid)
        except LafsError as exc:
            raise FsError(errno.EIO, f"cannot create the directory: {exc}") from None
        if directory.has(name, self._pending_in(directory)):  # created meanwhile by a concurrent call
            raise FsError(errno.EEXIST)
        inode = self._new_inode(DIRECTORY, cap, {})
        assert inode.directory is not None
        inode.directory.set_listing({})
        self._set_fields(inode, self._new_fields(caller, mode, directory, is_directory=True))
        self._enter_new(directory, name, inode)
        inode.lookups += 1
        return await self._attributes(inode)

    async def symlink(self, parent: int, name: str, target: str, caller: Caller) -> Attributes:
        directory = await self._new_entry_checks(parent, name)
        data = target.encode("utf-8", "surrogateescape")
        inode = self._new_inode(SYMLINK, None, {})
        fields = self._new_fields(caller, 0o777, directory)
        fields.mode, fields.symlink = 0o777, True
        self._set_fields(inode, fields)
        if len(data) <= LIT_THRESHOLD:
            inode.cap = LiteralCap(data)
        else:
            try:
                local = await self._materialize(inode, truncate=True)
                with local_disk("cannot keep the link's target"):
                    local.fill(data)
            except FsError:
                self._abandon(inode)
                raise
        self._enter_new(directory, name, inode)
        if inode.local is not None:
            self.uploader.queue(inode.local)
        inode.lookups += 1
        return await self._attributes(inode)

    async def mknod(self, parent: int, name: str, mode: int, rdev: int, caller: Caller) -> Attributes:
        """A new empty regular file (`tar --xattrs` makes each file that has attributes this way, sets them, then
        writes it), or a FIFO, socket or device (device number `rdev`, as st_rdev shows it): an entry of an empty
        LIT cap whose kind is in its metadata, so a Tahoe client sees an empty file."""
        file_type = stat.S_IFMT(mode)
        if file_type != stat.S_IFREG and file_type not in SPECIAL_TYPES.values():
            raise FsError(errno.EINVAL, "mknod makes only files, FIFOs, sockets and devices")
        directory = await self._new_entry_checks(parent, name)
        inode = self._new_inode(FILE if file_type == stat.S_IFREG else SPECIAL, LiteralCap(b""), {})
        fields = self._new_fields(caller, mode, directory)
        if inode.kind == SPECIAL:
            fields.special = file_type
            fields.rdev = rdev if file_type in DEVICE_TYPES else 0
        self._set_fields(inode, fields)
        self._enter_new(directory, name, inode)
        inode.lookups += 1
        return await self._attributes(inode)

    async def unlink(self, parent: int, name: str) -> None:
        await self._remove(parent, name, directory_wanted=False)

    async def rmdir(self, parent: int, name: str) -> None:
        await self._remove(parent, name, directory_wanted=True)

    async def _remove(self, parent: int, name: str, directory_wanted: bool) -> None:
        self._check_length(name)
        directory = await self.directories.fresh(self._dir_of(parent))
        self._check_writable(directory)
        inode = self._child(directory, name)
        if inode is None:
            raise FsError(errno.ENOENT)
        if directory_wanted and inode.kind != DIRECTORY:
            raise FsError(errno.ENOTDIR)
        if not directory_wanted and inode.kind == DIRECTORY:
            raise FsError(errno.EISDIR)
        if directory_wanted:
            assert inode.directory is not None
            child = await self.directories.fresh(inode.directory)
            if child.names(self._pending_in(child)):
                raise FsError(errno.ENOTEMPTY)
        self._record_removal(directory, name)
        self._entries_changed(directory)
        self._name_removed(inode, directory, name)

    def _name_removed(self, inode: Inode, directory: Directory, name: str) -> None:
        """This mount removed the inode's name `name` (unlink, or a rename over it): a hard-linked file counts one
        name fewer in the names it is known by, and one left with a single name is an ordinary file again."""
        fields = self._fields(inode)
        links = self._file_links(inode, fields)
        self._unname(inode, directory, name)
        if fields.link_id is not None:
            fields.link_count = links - 1
            if fields.link_count <= 1:
                fields.link_id, fields.link_count = None, 1
            fields.ctime_ns = time.time_ns()
            try:
                self._change_fields(inode, fields)
            except FsError as exc:  # the name is gone all the same; only the count the others show stays as it was
                log.warning("cannot record the link count of a file's other names: %s", exc)
        self._maybe_drop(inode)

    async def rename(self, parent_old: int, name_old: str, parent_new: int, name_new: str, flags: int) -> None:
        if flags & RENAME_EXCHANGE and flags & RENAME_NOREPLACE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE and RENAME_NOREPLACE exclude each other")
        self._check_length(name_old)
        self._check_new_name(name_new)
        source_dir = await self.directories.fresh(self._dir_of(parent_old))
        target_dir = await self.directories.fresh(self._dir_of(parent_new))
        self._check_writable(source_dir)
        self._check_writable(target_dir)
        inode = self._child(source_dir, name_old)
        if inode is None:
            raise FsError(errno.ENOENT)
        if source_dir is target_dir and name_old == name_new:
            return
        self._check_not_into_itself(inode, target_dir)
        replaced = self._child(target_dir, name_new)
        if replaced is inode:
            return  # two names of one file: Linux leaves both
        if flags & RENAME_EXCHANGE:
            if replaced is None:
                raise FsError(errno.ENOENT)
            self._check_not_into_itself(replaced, source_dir)
            # Both links in one journal record: after a crash, both names are swapped or neither. Both things
            # swapped change (their ctime), as on Linux; refused, neither does.
            before = [(moved, moved.metadata, moved.written_ns) for moved in (inode, replaced)]
            now = time.time_ns()
            for moved in (inode, replaced):
                fields = self._fields(moved)
                fields.ctime_ns = now
                self._set_fields(moved, fields)
            try:
                there = self._new_link(target_dir, name_new, inode)
                back = self._new_link(source_dir, name_old, replaced)
                self._record_change(there, back)
            except FsError:
                for moved, metadata, written_ns in before:
                    moved.metadata, moved.written_ns = metadata, written_ns
                raise
            self._unname(inode, source_dir, name_old)
            self._unname(replaced, target_dir, name_new)
            self._linked(target_dir, name_new, inode, there)
            self._linked(source_dir, name_old, replaced, back)
            self._entries_changed(source_dir, target_dir)
            return
        if replaced is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if replaced.kind == DIRECTORY and inode.kind != DIRECTORY:
                raise FsError(errno.EISDIR)
            if replaced.kind != DIRECTORY and inode.kind == DIRECTORY:
                raise FsError(errno.ENOTDIR)
            if replaced.kind == DIRECTORY:
                assert replaced.directory is not None
                if (await self.directories.fresh(replaced.directory)).names(self._pending_in(replaced.directory)):
                    raise FsError(errno.ENOTEMPTY)
        # The new name is recorded before anything changes: refused (a full disk), the rename changes nothing;
        # and a crash or refusal between the two records leaves two names, never none. A rename changes the
        # inode (its ctime), as on Linux: a hard-linked file's other names get it in the same record, so that
        # whichever name the inode's fields are next read from shows it.
        fields = self._fields(inode)
        fields.ctime_ns = time.time_ns()
        names = [where for where in inode.names if where != (source_dir, name_old)] + [(target_dir, name_new)]
        self._change_fields(inode, fields, names)
        if replaced is not None:
            self._name_removed(replaced, target_dir, name_new)
        self._unname(inode, source_dir, name_old)
        self._record_removal(source_dir, name_old)
        self._entries_changed(source_dir, target_dir)

    def _check_not_into_itself(self, inode: Inode, directory: Directory) -> None:
        """EINVAL for moving a directory into `directory` when that is the directory itself or below it."""
        if inode.directory is not None and self._levels_up_to(directory, inode.directory.readonly_cap) is not None:
            raise FsError(errno.EINVAL, "cannot move a directory into itself")

    async def link(self, inode: int, new_parent: int, new_name: str) -> Attributes:
        """A new name for a file: the same inode under both. Every name's entry holds the file's cap and a link
        identity with the count of names (metadata.py), so a lookup of any name, by this mount or a later one,
        finds the one inode (the table of linked inodes, by identity). Linking costs no key and no upload, only
        the entries (the new name, and the count in the names known): a tree of files linked by `cp -al` or
        rsnapshot is as cheap as its directories. The first write through any name makes the file mutable
        (`_writable_copy`), and every name known gets the mutable cap; the names not looked up since the mount
        started get it from a sweep (link_sweep.py), never started by a link itself."""
        node = self.inodes[inode]
        if node.kind in (DIRECTORY, LOOP):
            raise FsError(errno.EPERM, "directories cannot be hard-linked")
        if not node.names:
            raise FsError(errno.ENOENT, "the file has no name left to link to")
        directory = await self._new_entry_checks(new_parent, new_name)
        fields = self._fields(node)
        fields.link_count = self._file_links(node, fields) + 1
        fields.link_id = fields.link_id or secrets.token_hex(16)
        fields.ctime_ns = time.time_ns()
        # The new name and the other names' new count in one record: refused, nothing changes; after a crash,
        # all of them or none. A link starts no sweep for the names not known (a tree linked by a backup must stay
        # cheap), but joins one pending for the file, so that the names it finds get this link's count.
        new_names = [*node.names, (directory, new_name)]
        self._change_fields(node, fields, new_names, sweep=fields.link_id in self.stale_links)
        self._entries_changed(directory)
        if node.local is not None and node.local.dirty and node.local.writers == 0:
            self.uploader.queue(node.local)  # wanted again, if its upload was skipped while it had no name
        node.lookups += 1
        return await self._attributes(node)

    # --- operations: files --------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int) -> int:
        node = self.inodes[inode]
        if node.kind == DIRECTORY:
            raise FsError(errno.EISDIR)
        if node.kind == SPECIAL:  # the kernel opens these itself; the entry's empty cap is no content to serve
            raise FsError(errno.ENXIO, "a FIFO, socket or device has no content on the grid")
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC)  # even opened read-only: Linux truncates then, as tmpfs does
        if writable or truncate:
            self._check_writable(node.parent)
            if not self._replaceable(node.cap):
                raise FsError(errno.EACCES, "the file is read-only")
            had_copy = node.local is not None
            local = await self._writable_copy(node, truncate=truncate)
            if truncate:
                try:
                    self._mark_written(node, was_dirty=False)
                except FsError:  # not recorded (a full disk): a copy made just now goes again, unless recorded
                    # links wait for it (a linked file made mutable); one that was there already stays emptied (its
                    # old content is on the grid under the unchanged entry)
                    fresh = node.local if not had_copy else None
                    if fresh is not None and fresh.id not in self.write_back.waiting_locals():
                        self._release_local(node)
                    raise
            if writable:
                local.writers += 1
            elif local.writers == 0:
                self.uploader.queue(local)  # emptied with no writer to close it: upload as a setattr would
        elif isinstance(node.cap, MutableWriteCap | MutableReadCap):
            await self._materialize(node)
        return self.handles.open(node, writable)

    def _mark_written(self, inode: Inode, was_dirty: bool) -> None:
        """Note a change of content: its time, and a journal record unless a pending one already names the
        local file (the case on every write after the first, which then costs no metadata work)."""
        inode.written_ns = time.time_ns()
        if not was_dirty or not self._entry_pending(inode):
            self._touch(inode, sweep_for=link_identity(inode.metadata))

    async def create(self, parent: int, name: str, mode: int, flags: int, caller: Caller) -> tuple[int, Attributes]:
        directory = await self._new_entry_checks(parent, name)
        inode = self._new_inode(FILE, None, {})
        self._set_fields(inode, self._new_fields(caller, mode, directory))
        try:
            local = await self._materialize(inode, truncate=True)
        except FsError:
            self._abandon(inode)
            raise
        self._enter_new(directory, name, inode)
        local.writers += 1
        fh = self.handles.open(inode, True)
        inode.lookups += 1
        return fh, await self._attributes(inode)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        inode = self.handles[fh].inode
        if inode.local is not None:
            return inode.local.pread(offset, size)
        cap = inode.cap
        if isinstance(cap, LiteralCap):
            return cap.data[offset : offset + size]
        if isinstance(cap, ChkCap):
            try:
                return await self.read_cache.read(cap, offset, size)
            except LafsError as exc:
                log.warning("read failed: %s", exc)
                raise FsError(errno.EIO, str(exc)) from None
        return b""

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles[fh]
        if not handle.writable:
            raise FsError(errno.EBADF)
        inode = handle.inode
        assert inode.local is not None
        was_dirty = inode.local.dirty
        with local_disk("cannot write the local copy"):
            written = inode.local.pwrite(offset, data)
        self._mark_written(inode, was_dirty)
        return written

    async def flush(self, fh: int) -> None:
        self.handles[fh]

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._sync_inode(self.handles[fh].inode)

    async def _sync_inode(self, inode: Inode) -> None:
        """Return once the inode's content and its entry, and the entries of its directories that are new, are on
        the grid. A directory whose entry is there already is not waited for: what is pending for it is only its
        metadata (times its changes gave it, above all), and waiting would cost a publish per level up to the root."""
        if inode.local is not None and inode.local.dirty and not self._orphaned(inode.local):
            await self.uploader.upload(inode.local)
            if inode.local is not None and inode.local.dirty:
                failure = self.uploader.retries.failures.get(inode.local.id)
                raise FsError(
                    errno.EIO, f"upload failed: {failure.error if failure else 'the file changed during fsync'}"
                )
        with local_disk("cannot sync the journal"):
            self.journal.sync()
        # every name of the inode, then each directory's own entry up to the root
        entries = [(inode, directory, name) for directory, name in inode.names]
        while entries:
            node, directory, name = entries.pop()
            while self._pending_link(directory, name) is node and (
                node is inode or not self._on_grid(node, directory, name)
            ):
                await self.publisher.round(directory.key)
                failure = self.publisher.retries.failures.get(directory.key)
                if failure is not None and self._pending_link(directory, name) is node:
                    raise FsError(errno.EIO, f"directory update failed: {failure.error}")
            above = directory.inode
            if above is not None and above.parent is not None:
                entries.append((above, above.parent, above.name))

    async def release(self, fh: int) -> None:
        handle = self.handles.close(fh)
        inode = handle.inode
        if handle.writable and inode.local is not None:
            inode.local.writers -= 1
            if inode.local.writers == 0 and inode.local.dirty:
                self.uploader.queue(inode.local)
                self._closed_unsynced[inode.local.id] = inode.local
                self._closed_wanted.set()
        self._maybe_drop(inode)

    # --- operations: directories --------------------------------------------------------------------------
    async def opendir(self, inode: int) -> int:
        """A listing handle: "." and "..", then the names as they are now (those the kernel can take: a name
        another Tahoe client made longer than NAME_MAX bytes, or holding "/", is left out)."""
        directory = await self.directories.fresh(self._dir_of(inode))
        names = [".", ".."] + [name for name in directory.names(self._pending_in(directory)) if showable(name)]
        return self.handles.open(self.inodes[inode], False, names)

    async def readdir(self, fh: int, offset: int) -> list[DirectoryEntry]:
        handle = self.handles[fh]
        directory = handle.inode.directory
        if directory is None or handle.names is None:
            raise FsError(errno.ENOTDIR)
        entries: list[DirectoryEntry] = []
        index = offset
        # An empty answer means the end: names removed since opendir are skipped without shortening the batch.
        while index < len(handle.names) and len(entries) < READDIR_BATCH:
            name = handle.names[index]
            index += 1
            inode = self._listed(handle.inode, directory, name)
            if inode is None:
                continue
            entries.append(DirectoryEntry(name, await self._attributes(inode), index))
            inode.lookups += 1
        return entries

    def _listed(self, inode: Inode, directory: Directory, name: str) -> Inode | None:
        """The inode a listing shows at `name`: "." is the directory itself, ".." its parent as last looked up (the
        root's own parent is outside the mount: the kernel shows the root's number there, as for any mount root)."""
        if name == ".":
            return inode
        if name == "..":
            parent = inode.parent.inode if inode.parent is not None else None
            return parent if parent is not None and self.inodes.holds(parent) else inode
        return self._child(directory, name)

    async def releasedir(self, fh: int) -> None:
        await self.release(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self.handles[fh]
        directory = handle.inode.directory
        if directory is None:
            raise FsError(errno.ENOTDIR)
        with local_disk("cannot sync the journal"):
            self.journal.sync()
        pending = [(name, self._pending_link(directory, name)) for name in self._pending_in(directory)]
        for name, item in pending:
            if item is not None:
                await self._sync_inode(item)
            else:
                while isinstance(self.write_back.change(directory.key, name), Removal):
                    await self.publisher.round(directory.key)
                    failure = self.publisher.retries.failures.get(directory.key)
                    if failure is not None:
                        raise FsError(errno.EIO, f"directory update failed: {failure.error}")

    async def statfs(self) -> FsStats:
        async def ask(server: StorageServer) -> int:
            return (await server.get_version()).available_space

        results = await gather_per_server(self.grid.servers, ask, timeout=10)
        raw = sum(r for r in results.values() if isinstance(r, int))
        encoding = self.grid.encoding
        usable = raw * encoding.needed // max(encoding.total, 1)
        blocks = usable // BLOCK
        return FsStats(BLOCK, blocks, blocks, blocks, 1 << 20, 1 << 20, NAME_MAX)

    # --- operations: extended attributes ------------------------------------------------------------------
    # user.tahoe.cap and user.tahoe.readcap show an entry's caps to whoever asks by name, but listxattr leaves them
    # out: cp -a, tar --xattrs and rsync -X copy what is listed, and a write cap in a copy or an archive would let
    # whoever gets it change the grid object.
    @staticmethod
    def _cap_value(node: Inode, name: str) -> bytes | None:
        """What the cap attribute `name` shows for the inode; None while its content is not on the grid."""
        if node.cap is None or (node.local is not None and node.local.dirty):
            return None
        cap = node.cap if name == CAP_XATTR else node.cap.readonly()
        return cap.to_string().encode("ascii")

    async def getxattr(self, inode: int, name: str) -> bytes:
        node = self.inodes[inode]
        if name in (FLUSH_XATTR, QUEUE_XATTR):
            if name == FLUSH_XATTR:
                self._urge()
            return await self._flush_progress()
        if name in (CAP_XATTR, READCAP_XATTR):
            value = self._cap_value(node, name)
            if value is None:
                raise FsError(errno.ENODATA, "the file is not on the grid yet")
            return value
        value = self._fields(node).xattrs.get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    async def setxattr(self, inode: int, name: str, value: bytes, flags: int) -> None:
        """Set a user attribute. A cap attribute cannot change: setting it to the cap it shows is a no-op (a copy
        made before caps were unlisted carries them, and rsync -X back onto the same entries sets them again);
        any other value is EPERM, which cp -a ignores and tar reports as a warning."""
        node = self.inodes[inode]
        if name in (FLUSH_XATTR, QUEUE_XATTR):
            raise FsError(errno.EPERM, "the flush attributes can only be read")
        if name in (CAP_XATTR, READCAP_XATTR):
            if value != self._cap_value(node, name):
                raise FsError(errno.EPERM, "a cap attribute can only be set to the cap it already shows")
            return
        if not name.startswith(XATTR_NAMESPACE):
            raise FsError(errno.ENOTSUP)
        self._check_writable(node.parent)
        fields = self._fields(node)
        if flags & XATTR_CREATE and name in fields.xattrs:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in fields.xattrs:
            raise FsError(errno.ENODATA)
        fields.xattrs[name] = value
        fields.ctime_ns = time.time_ns()
        self._change_fields(node, fields)

    async def listxattr(self, inode: int) -> list[str]:
        return sorted(self._fields(self.inodes[inode]).xattrs)

    async def removexattr(self, inode: int, name: str) -> None:
        node = self.inodes[inode]
        if name in (CAP_XATTR, READCAP_XATTR, FLUSH_XATTR, QUEUE_XATTR):
            raise FsError(errno.EPERM, "cap and flush attributes cannot be removed")
        self._check_writable(node.parent)
        fields = self._fields(node)
        if name not in fields.xattrs:
            raise FsError(errno.ENODATA)
        del fields.xattrs[name]
        fields.ctime_ns = time.time_ns()
        self._change_fields(node, fields)


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fsync_and_close(descriptors: list[int], directory: Path) -> None:
    """fsync and close each descriptor (duplicates the caller made), then the directory holding the files, so
    their names survive a power loss too."""
    for fd in descriptors:
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("fsync of a closed file failed: %s", exc)
        finally:
            os.close(fd)
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except OSError as exc:  # as above: the files are safe from a crash, only power loss could lose their names
        log.warning("fsync of the local files' directory failed: %s", exc)


@asynccontextmanager
async def open_root(state: NodeState, root_cap: str, options: FilesystemOptions) -> AsyncIterator[GridFilesystem]:
    """The filesystem rooted at `root_cap`, over a node state some other roots may share; on exit it drains the
    write-back queue (what does not make it stays in the journal for the next start)."""
    try:
        root = parse_cap(root_cap, allow_prefixes=True)
    except LafsError as exc:
        raise DirectoryError(f"the root is not a valid cap: {exc}") from None
    if not isinstance(root, DirectoryCap):
        raise DirectoryError("the root cap is not a directory")
    filesystem: GridFilesystem | None = None
    try:
        async with trio.open_nursery() as nursery:
            directory = state.root_directory(root)
            filesystem = GridFilesystem(
                state.grid, root, options, directory, nursery, state.read_cache, state.first_number, state.lease_renewal
            )
            try:
                await filesystem.start()
                yield filesystem
                await filesystem.drain()
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if filesystem is not None:
            filesystem.close()  # once its tasks have ended: none may touch a closed journal or file


@asynccontextmanager
async def open_filesystem(
    node: NodeDirectory, root_cap: str, options: FilesystemOptions
) -> AsyncIterator[GridFilesystem]:
    """One root of a node directory, alone in this process (`--no-split`, tests)."""
    async with open_node_state(node, options.cache_size) as state, open_root(state, root_cap, options) as filesystem:
        yield filesystem
