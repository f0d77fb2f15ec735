"""The disk cache of downloaded file content: verified plaintext segments of CHK files, kept sparse on disk.

Why a cache: FUSE reads arrive in pieces of 4 KiB to 1 MiB, while the grid can only hand out whole verified
segments (1 MiB by default), so every segment a read touches is fetched once, kept, and later reads of the
same bytes are one `pread`. Content survives a remount, so a file read once is readable offline.

Never wrong bytes. Only segments ImmutableFile has verified against the cap's hash trees are written. A segment
counts as present only once its slot is valid, and the slot is written after the data; a torn slot fails its
check and reads as absent, and a damaged header discards the whole entry. Nothing is fsynced, so after a power
loss a slot may survive while the data it describes did not; therefore a segment found on disk is checked
against its slot's SHA-256 the first time this process reads it (one whole-segment read and hash per segment
per run), and one that fails is dropped and fetched again. Segments this process wrote itself are trusted for
the rest of the run; a short read (file truncated underneath us) also sends the segment back to the grid.

The parts, one job each:

    read_cache_format   the on-disk format, sans-IO: names, headers, slots
    read_cache_files    the directory, its lock, each entry's files, the LRU bound on open descriptors
    read_cache_index    which segments are present, the size accounting and eviction
    read_cache_fetcher  getting a segment: disk, memory buffer, fetches in flight, background stores, readahead
    read_cache          this module: the ReadCache its users see, its life cycle, and the glue of the parts
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import trio

from lafs_core.caps import ChkCap, LiteralCap
from lafs_core.grid.grid import Grid

from .read_cache_fetcher import SegmentFetcher
from .read_cache_files import (
    CacheInUseError,
    EntryFiles,
    OpenFiles,
    ScannedEntry,
    lock_directory,
    scan_directory,
    set_access_times,
)
from .read_cache_format import Identity, pack_header
from .read_cache_index import CacheIndex, Entry, Hold

__all__ = ["CacheInUseError", "ReadCache", "ReadCacheStats"]

log = logging.getLogger("blackmatch.read_cache")

DEFAULT_READAHEAD_BYTES = 8 * 1024 * 1024
DEFAULT_FETCH_CONCURRENCY = 4
DEFAULT_MAX_OPEN_FILES = 64
DEFAULT_MEMORY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ReadCacheStats:
    """Counters for logs, tests and benchmarks (a snapshot)."""

    segments_fetched: int  # segments downloaded from the grid, foreground and readahead
    readahead_fetched: int  # of which by readahead
    disk_reads: int  # segment pieces served from the disk cache
    memory_reads: int  # segment pieces served from the in-memory buffer
    discarded_segments: int  # cached segments that failed their check (or vanished) and were dropped
    evicted_files: int
    evicted_segments: int


class ReadCache:
    """Verified reads of CHK files through a size-bounded, persistent disk cache of their segments.

    Use as `async with ReadCache(directory, grid, max_bytes) as cache:`; the cache owns a nursery for its
    readahead and disk-write tasks, and the `async with` block scans the directory (taking its lock) on entry;
    on exit it cancels readahead, lets disk writes under way finish and releases the directory.
    """

    def __init__(
        self,
        directory: Path,
        grid: Grid,
        max_bytes: int,
        *,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
        fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        if max_bytes < 0 or readahead_bytes < 0 or memory_bytes < 0:
            raise ValueError("cache sizes must not be negative")
        if fetch_concurrency < 1 or max_open_files < 1:
            raise ValueError("fetch_concurrency and max_open_files must be at least 1")
        self.directory = Path(directory)
        self.fetch_concurrency = fetch_concurrency
        self._index = CacheIndex(max_bytes, remove=self._remove_files, punch=self._punch, on_idle=self._on_idle)
        self._open: OpenFiles[Entry] = OpenFiles(max_open_files)  # recently read: may hold fds and a grid reader
        self._fetcher = SegmentFetcher(
            grid,
            self._index,
            self._open_files,
            readahead_bytes=readahead_bytes,
            fetch_concurrency=fetch_concurrency,
            memory_bytes=memory_bytes,
        )
        self._lock_fd: int | None = None
        self._nursery_manager: contextlib.AbstractAsyncContextManager[trio.Nursery] | None = None
        self._closed = False

    @property
    def max_bytes(self) -> int:
        """The bound on bytes cached on disk."""
        return self._index.max_bytes

    @property
    def stats(self) -> ReadCacheStats:
        fetcher, index = self._fetcher, self._index
        return ReadCacheStats(
            segments_fetched=fetcher.segments_fetched,
            readahead_fetched=fetcher.readahead_fetched,
            disk_reads=fetcher.disk_reads,
            memory_reads=fetcher.memory_reads,
            discarded_segments=index.discarded_segments,
            evicted_files=index.evicted_files,
            evicted_segments=index.evicted_segments,
        )

    # --- life cycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> ReadCache:
        if self._nursery_manager is not None or self._closed:
            raise RuntimeError("a ReadCache is entered once")
        scanned = await trio.to_thread.run_sync(self._prepare_directory)
        for found in scanned:  # least recently read first
            parsed = found.parsed
            files = EntryFiles(self.directory, parsed.identity.name, on_disk=True)
            entry = Entry(parsed.identity, files, parsed.segment_size, last_access_ns=found.mtime_ns)
            self._index.add(entry, parsed.records)
        self._index.make_room(0)  # the limit may be smaller than last time
        manager = trio.open_nursery()
        self._fetcher.start(await manager.__aenter__())
        self._nursery_manager = manager
        log.info(
            "read cache: %d files, %d bytes cached (limit %d)", len(self._index), self.cached_bytes(), self.max_bytes
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop readahead, finish disk writes under way, close files, remember access order for the next run.

        Call it (or leave the `async with` block) in the task that entered.
        """
        if self._closed:
            return
        self._closed = True
        if self._nursery_manager is not None:
            self._fetcher.stop()
            await self._nursery_manager.__aexit__(None, None, None)
        touched = [(e.files.meta_path, e.last_access_ns) for e in self._index.entries() if e.files.on_disk]
        for entry in self._open.entries():
            if entry.users == 0:
                self._close(entry)
        self._fetcher.memory.clear()

        def finish() -> None:
            set_access_times(touched)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock

        with trio.CancelScope(shield=True):  # closing under cancellation must still release the lock
            await trio.to_thread.run_sync(finish)
        self._lock_fd = None

    def _prepare_directory(self) -> list[ScannedEntry]:
        """Create the directory 0700, take its lock, and load every good entry (discarding bad ones)."""
        lock_fd = lock_directory(self.directory)
        try:
            found = scan_directory(self.directory)
        except BaseException:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        return found

    # --- the public surface ----------------------------------------------------------------------------------
    async def read(self, cap: ChkCap | LiteralCap, offset: int, size: int) -> bytes:
        """Verified plaintext [offset, offset+size) of the file, clipped to its end.

        Fetches only the segments the range covers that are not cached; raises what ImmutableFile raises
        (NotEnoughSharesError when the file cannot be recovered), never returns unverified bytes.
        """
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        if isinstance(cap, LiteralCap):
            return cap.data[offset : offset + size]
        if self._nursery_manager is None or self._closed:
            raise RuntimeError("ReadCache is not open (use `async with ReadCache(...)`)")
        end = min(offset + size, cap.size)
        if offset >= end:
            return b""
        with self._use_entry(cap) as entry:
            sequential = entry.last_end == offset
            entry.last_end = end
            segment_size = await self._fetcher.segment_size(entry, cap)
            first, last = offset // segment_size, (end - 1) // segment_size
            if sequential:
                self._fetcher.schedule_readahead(entry, cap, last)
            if first == last:
                base = first * segment_size
                return await self._fetcher.segment_bytes(entry, cap, first, offset - base, end - base)
            return await self._read_segments(entry, cap, offset, end, first, last)

    async def wait_idle(self) -> None:
        """Wait until readahead and background disk writes started so far are done (tests, benchmarks)."""
        await self._fetcher.wait_idle()

    def cached_bytes(self) -> int:
        """Bytes of plaintext held on disk (present segments), the quantity kept under `max_bytes`."""
        return self._index.total

    def cached_segments(self, cap: ChkCap) -> list[int]:
        """Segment numbers of this file present on disk."""
        entry = self._index.get(Identity.of(cap).name)
        return sorted(entry.records) if entry is not None else []

    def drop(self, cap: ChkCap | LiteralCap) -> None:
        """Forget one file's cached content (reads in progress finish from what they already opened)."""
        if isinstance(cap, LiteralCap):
            return
        name = Identity.of(cap).name
        entry = self._index.get(name)
        if entry is not None:
            self._index.discard(entry)
        self._fetcher.memory.forget(name)

    def clear(self) -> None:
        """Forget everything cached."""
        for entry in self._index.entries():
            self._index.discard(entry)
        self._fetcher.memory.clear()

    def check(self) -> None:
        """Raise AssertionError unless the size accounting adds up (for tests)."""
        self._index.check()

    # --- reading ---------------------------------------------------------------------------------------------
    def _use_entry(self, cap: ChkCap) -> Hold:
        """A hold on the file's entry (made if new), which is marked most recently used."""
        identity = Identity.of(cap)
        entry = self._index.get(identity.name)
        if entry is not None and entry.identity != identity:  # only on a SHA-256 collision; never serve it
            self._index.discard(entry)
            entry = None
        if entry is None:
            entry = Entry(identity, EntryFiles(self.directory, identity.name))
            self._index.add(entry)
        self._index.touch(entry)
        hold = self._index.hold(entry)
        for victim in self._open.touch(entry):
            self._close_idle(victim)
        return hold

    async def _read_segments(self, entry: Entry, cap: ChkCap, offset: int, end: int, first: int, last: int) -> bytes:
        """A read spanning several segments: up to `fetch_concurrency` of them at once, first error wins."""
        pieces: list[bytes] = [b""] * (last - first + 1)
        errors: list[Exception] = []
        limiter = trio.CapacityLimiter(self.fetch_concurrency)

        async def one(segnum: int, nursery: trio.Nursery) -> None:
            start, stop = entry.span(segnum)
            try:
                async with limiter:
                    pieces[segnum - first] = await self._fetcher.segment_bytes(
                        entry, cap, segnum, max(offset, start) - start, min(end, stop) - start
                    )
            except Exception as exc:
                errors.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for segnum in range(first, last + 1):
                nursery.start_soon(one, segnum, nursery)
        if errors:
            raise errors[0]
        return b"".join(pieces)

    # --- glue: files, descriptors and eviction -----------------------------------------------------------
    def _open_files(self, entry: Entry, create: bool) -> bool:
        """Open (or, with `create`, make) the entry's files; False if they are not there.

        Runs on the trio thread, between two checkpoints: a dropped entry never touches the paths again.
        """
        files = entry.files
        if files.is_open:
            return True
        if entry.dropped:
            return False
        try:
            if files.open():
                return True
        except OSError as exc:
            log.warning("read cache: files of %s are gone (%s); fetching again", entry.short, exc)
            self._index.forget_segments(entry)
        if not create:
            return False
        assert entry.segment_size is not None
        files.create(pack_header(entry.identity, entry.segment_size)[0])
        return True

    def _close(self, entry: Entry) -> None:
        """Let go of what an entry without holds has open: descriptors and grid reader."""
        entry.files.close()
        self._fetcher.close(entry)
        self._open.remove(entry)

    def _close_idle(self, entry: Entry) -> None:
        """Close an entry pushed out of the open LRU; one that caches nothing is not worth an index entry."""
        self._close(entry)
        if entry.bytes == 0 and self._index.get(entry.name) is entry:
            self._index.discard(entry)

    def _on_idle(self, entry: Entry) -> None:
        if entry.dropped or self._closed:
            self._close(entry)
        else:
            for victim in self._open.trim():
                self._close_idle(victim)

    def _remove_files(self, entry: Entry) -> None:
        entry.files.remove()
        if entry.users == 0:
            self._close(entry)

    def _punch(self, entry: Entry, segnum: int) -> bool:
        """Drop one segment: free its blocks, then clear its slot (the digest check covers a crash between)."""
        if not self._open_files(entry, False) or segnum not in entry.records:
            return True
        start, stop = entry.span(segnum)
        try:
            entry.files.punch(start, stop - start)
        except OSError as exc:
            log.warning("read cache: cannot punch holes in cache files (%s); evicting whole files only", exc)
            return False
        entry.files.clear_slot(segnum)
        return True
