"""The link sweep: a background walk of the root's tree that finds the names of hard-linked files a change missed
(stale_links.py), so that each is brought up to date.

The policy:
- A walk starts SWEEP_COALESCE seconds after a sweep is recorded, so that `rm -r` of a tree of linked files (a
  sweep per file) costs one walk; at once when a drain asks.
- It serves every sweep pending when it starts. It reads each directory once, through the directory views as a
  lookup does, and descends into its subdirectories (a directory reached twice, by a Tahoe directory loop or a
  second link, is read once). It stops once every sweep it serves has found as many names as its file has, or the
  tree is walked. Only the names carrying a served identity become inodes, through `visit` (the filesystem's
  lookup path, which brings a stale name up to date); `let_go` releases them after the walk. The rest of the tree
  costs a listing read per directory, and no memory once the walk ends.
- A served sweep is done (`swept`) when its names were all found or the whole tree was walked, unless a later change
  of the file merged into it meanwhile: then the next walk serves it again.
- A walk that fails (a directory that cannot be read, a full disk) is kept as a failure (retries.py) and tried
  again after its back-off, not sooner for new sweeps, at once for a drain; a sweep whose names it had all found
  before failing is done all the same. Memory while walking: the directories read (their read caps) and those
  still to read.
- Making a link never records a sweep (a backup links whole trees): at most it joins one pending for its file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import trio

from lafs_core.caps import DirectoryCap

from .directory_views import DirectoryViews
from .journal_records import Change, Link, LinkSweep, Removal
from .metadata import link_identity
from .nodes import Directory, Inode
from .operations import FsError
from .retry_timer import RetryTimer
from .stale_links import StaleLinks

SWEEP_COALESCE = 1.0  # seconds a walk waits for more sweeps before it starts
WALK = "walk"  # the failure key of the one walk
WALK_DESCRIPTION = "the walk for hard-linked files' other names"


@dataclass
class _Walk:
    """One walk's progress: the sweeps it serves, the names of each it has found, and the inodes it made."""

    serving: dict[str, LinkSweep]
    wanted: dict[str, int]
    found: dict[str, int]
    visited: list[Inode]

    def all_found(self) -> bool:
        return all(self.found[identity] >= wanted for identity, wanted in self.wanted.items())


class LinkSweeper:
    """`pending_in(directory)`: the directory's pending changes; `visit(directory, name)`: the inode at a listed
    name, brought up to date if stale; `let_go(inode)`: the walk no longer needs it; `swept(sweeps)`: these sweeps
    are done; `progress()`: a directory was read (a drain waiting on the walk sees it move)."""

    def __init__(
        self,
        stale: StaleLinks,
        views: DirectoryViews,
        root: DirectoryCap,
        pending_in: Callable[[Directory], Mapping[str, Change]],
        visit: Callable[[Directory, str], Inode | None],
        let_go: Callable[[Inode], None],
        swept: Callable[[list[LinkSweep]], None],
        progress: Callable[[], None],
    ) -> None:
        self._stale, self._views, self._root = stale, views, root
        self._pending_in, self._visit, self._let_go, self._swept, self._progress = (
            pending_in,
            visit,
            let_go,
            swept,
            progress,
        )
        self._wanted = trio.Event()  # wakes `run`: a sweep to walk for
        self._urgent = trio.Event()  # ends its wait for more sweeps
        self.retries: RetryTimer[str] = RetryTimer(self._retry)

    def want(self) -> None:
        """A sweep was recorded: walk soon, unless a failing walk waits for its back-off (then it waits too)."""
        if self.retries.failures.get(WALK) is None:
            self._wanted.set()

    def now(self) -> None:
        """Walk at once (a drain), failed or not."""
        self._urgent.set()
        self._wanted.set()

    def _retry(self, _key: str) -> None:
        self.now()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.retries.run)
            while True:
                await self._wanted.wait()
                with trio.move_on_after(SWEEP_COALESCE):
                    await self._urgent.wait()
                self._wanted, self._urgent = trio.Event(), trio.Event()
                if not len(self._stale):
                    continue
                try:
                    await self._walk()
                except FsError as exc:  # a directory the grid did not give, a change the disk did not take
                    self.retries.failed(WALK, OSError(exc.errno, exc.message), WALK_DESCRIPTION)
                except Exception as exc:
                    self.retries.failed(WALK, exc, WALK_DESCRIPTION)
                else:
                    self.retries.failures.succeeded(WALK)
                    if len(self._stale):  # changed during the walk: the names it passed may have missed that
                        self._wanted.set()

    async def _walk(self) -> None:
        serving = self._stale.pending()
        walk = _Walk(
            serving,
            {identity: self._stale.names_wanted(sweep) for identity, sweep in serving.items()},
            dict.fromkeys(serving, 0),
            [],
        )
        walked_all = False
        try:
            walked_all = await self._walk_tree(walk)
        finally:
            for inode in walk.visited:
                self._let_go(inode)
            done = [
                sweep
                for identity, sweep in serving.items()
                if (walked_all or walk.found[identity] >= walk.wanted[identity]) and self._stale.current(sweep)
            ]
            if done:
                self._swept(done)

    async def _walk_tree(self, walk: _Walk) -> bool:
        """Walk until every served sweep has found its names; whether the whole tree was walked."""
        to_read = [self._root]
        seen: set[str] = set()
        while to_read:
            if walk.all_found():
                return False
            cap = to_read.pop()
            key = cap.readonly().to_string()
            if key in seen:
                continue
            seen.add(key)
            directory = await self._views.fresh(self._views.view(cap))
            for name, subdirectory, identity, listed in self._entries(directory):
                if subdirectory is not None:
                    to_read.append(subdirectory)
                if identity is not None and identity in walk.serving:
                    walk.found[identity] += 1
                    inode = self._visit(directory, name) if listed else None
                    if inode is not None:
                        walk.visited.append(inode)
            self._progress()
        return True

    def _entries(self, directory: Directory) -> Iterator[tuple[str, DirectoryCap | None, str | None, bool]]:
        """Each name in the directory's view: the directory it links (if it does), the link identity its entry
        carries, and whether the entry is the grid's (not a change of this mount's, pending)."""
        assert directory.listing is not None
        for name in directory.names(self._pending_in(directory)):
            change = self._pending_in(directory).get(name)
            if isinstance(change, Removal):
                continue
            if isinstance(change, Link):
                inode = directory.inodes.get(name)
                below = inode.directory.cap if inode is not None and inode.directory is not None else None
                yield name, below, link_identity(change.metadata), False
                continue
            entry = directory.listing.get(name)
            if entry is not None:
                below = entry.cap if isinstance(entry.cap, DirectoryCap) else None
                yield name, below, link_identity(entry.metadata), True
