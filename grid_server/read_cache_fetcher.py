"""Getting one verified segment for the read cache: from disk, from memory, from a fetch in flight, or the grid.

Concurrent reads of one segment share one fetch. A segment fetched for a waiting read is handed to the reader
at once and written to disk by a background task (up to MAX_BACKGROUND_STORES at once, past that the reader
writes it itself: backpressure), so disk writes add no latency to cold reads. Sequential reads start a
background readahead of the next `readahead_bytes` worth of segments. A segment that cannot get room on disk
is kept in a small in-memory buffer instead, which is also all there is when the cache's `max_bytes` is 0.
Large disk reads and writes, and the hashing, run in worker threads.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from lafs_core.caps import ChkCap
from lafs_core.errors import LafsError
from lafs_core.grid.download import ImmutableFile
from lafs_core.grid.grid import Grid

from .read_cache_files import pread_checked, pread_nowait, write_segment
from .read_cache_format import header_check
from .read_cache_index import CacheIndex, Entry, Hold

log = logging.getLogger("blackmatch.read_cache")

INLINE_READ_BYTES = 256 * 1024
"""Reads of verified cached data up to this size are first tried on the trio thread with RWF_NOWAIT, which
copies from the page cache or refuses at once (EAGAIN) instead of waiting for the disk; only a refusal goes to
a worker thread. Measured on the 2-core dev VM: 4 KiB reads 15 us inline vs 360 us through a worker thread,
128 KiB 47 vs 142 us, but 1 MiB 1.2 ms vs 0.66 ms (the copy dominates and the thread path copies once).
A segment is usually in the page cache: it was just written, or read whole to check it on its first read."""

MAX_BACKGROUND_STORES = 4
"""Segments fetched for a waiting read whose disk writes may still be running after the read returned."""


class MemoryBuffer:
    """Verified segments that could not go to disk (no room, a write error), least recently used first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._segments: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._total = 0

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._segments

    def get(self, name: str, segnum: int) -> bytes | None:
        data = self._segments.get((name, segnum))
        if data is not None:
            self._segments.move_to_end((name, segnum))
        return data

    def put(self, name: str, segnum: int, data: bytes) -> None:
        """Keep the segment, pushing out the least recently used ones past `max_bytes`."""
        key = (name, segnum)
        if key in self._segments or len(data) > self.max_bytes:
            return
        self._segments[key] = data
        self._total += len(data)
        while self._total > self.max_bytes:
            _key, old = self._segments.popitem(last=False)
            self._total -= len(old)

    def forget(self, name: str) -> None:
        """Drop one file's segments."""
        for key in [k for k in self._segments if k[0] == name]:
            self._total -= len(self._segments.pop(key))

    def clear(self) -> None:
        self._segments.clear()
        self._total = 0


class _Pending:
    """One in-flight fetch of a segment, which concurrent readers of that segment wait on."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None


@dataclass(eq=False)
class _Fetches:
    """A held file's fetching state; it exists while the file is open (see SegmentFetcher.close)."""

    fetch_concurrency: int
    inflight: dict[int, _Pending] = field(default_factory=dict)
    queued: set[int] = field(default_factory=set)  # readahead segments waiting for their turn
    immutable: ImmutableFile | None = None  # the grid reader: share choices and hash trees found so far
    _limiter: trio.CapacityLimiter | None = None

    def readahead_limiter(self) -> trio.CapacityLimiter:
        """Bounds the file's readahead fetches, over all its readahead tasks."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.fetch_concurrency)
        return self._limiter


class _Background:
    """The fetcher's background tasks, counted in this one place so that `wait_idle` can wait for them.

    Cancellable tasks (readahead) get their cancel scope when started, so `cancel` reaches even those that
    have not run yet; the others (disk writes) always run to their end.
    """

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        self._scopes: set[trio.CancelScope] = set()
        self.closed = False

    @property
    def accepting(self) -> bool:
        return self._nursery is not None and not self.closed

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start_soon(self, fn: Callable[[], Awaitable[None]], *, cancellable: bool) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope() if cancellable else None
        if scope is not None:
            self._scopes.add(scope)
        if self._running == 0:
            self._idle = trio.Event()
        self._running += 1
        self._nursery.start_soon(self._run, fn, scope)

    async def _run(self, fn: Callable[[], Awaitable[None]], scope: trio.CancelScope | None) -> None:
        try:
            if scope is None:
                await fn()
            else:
                with scope:
                    await fn()
        finally:
            if scope is not None:
                self._scopes.discard(scope)
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    def cancel(self) -> None:
        """No new tasks; cancel the cancellable ones (the nursery's owner then waits for the rest)."""
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()

    async def wait_idle(self) -> None:
        while self._running:
            await self._idle.wait()


class SegmentFetcher:
    """Verified segments of held entries, each fetched from the grid at most once at a time."""

    def __init__(
        self,
        grid: Grid,
        index: CacheIndex,
        open_files: Callable[[Entry, bool], bool],
        *,
        readahead_bytes: int,
        fetch_concurrency: int,
        memory_bytes: int,
    ) -> None:
        """`open_files(entry, create)` opens the entry's files (or makes them): False if there are none."""
        self.grid = grid
        self.readahead_bytes = readahead_bytes
        self.fetch_concurrency = fetch_concurrency
        self.memory = MemoryBuffer(memory_bytes)
        self._index = index
        self._open_files = open_files
        self._fetches: dict[Entry, _Fetches] = {}
        self._store_slots = trio.Semaphore(MAX_BACKGROUND_STORES)
        self._background = _Background()
        self.segments_fetched = 0  # from the grid, foreground and readahead
        self.readahead_fetched = 0  # of which by readahead
        self.disk_reads = 0  # segment pieces served from the disk cache
        self.memory_reads = 0  # segment pieces served from the memory buffer

    # --- life cycle ------------------------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        """Run background tasks in `nursery`; leaving it after `stop` waits for disk writes under way."""
        self._background.start(nursery)

    def stop(self) -> None:
        """Start no more background work and cancel readahead."""
        self._background.cancel()

    async def wait_idle(self) -> None:
        """Wait until readahead and background disk writes started so far are done."""
        await self._background.wait_idle()

    def close(self, entry: Entry) -> None:
        """The entry is no longer open (it has no holds): let go of its grid reader."""
        self._fetches.pop(entry, None)

    def _state(self, entry: Entry) -> _Fetches:
        state = self._fetches.get(entry)
        if state is None:
            state = self._fetches[entry] = _Fetches(self.fetch_concurrency)
        return state

    # --- reading ---------------------------------------------------------------------------------------------
    async def segment_size(self, entry: Entry, cap: ChkCap) -> int:
        """The file's segment size (from its shares, the first time)."""
        if entry.segment_size is None:
            immutable = self._immutable(entry, cap)
            try:
                segment_size = await immutable.segment_size()
            except LafsError:
                self._forget_immutable(entry, immutable)
                raise
            if entry.segment_size is None:
                entry.segment_size = segment_size
        return entry.segment_size

    async def segment_bytes(self, entry: Entry, cap: ChkCap, segnum: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of one segment: from disk, from memory, from a fetch in flight, or fetched now.

        A fetch that fails wakes its waiters, and the first of them to look again fetches in turn (the others
        wait on that one): each task fetches at most once, so one ChkReader never runs two fetches of one
        segment at a time (its truncation check would blame good shares).
        """
        state = self._state(entry)
        for _attempt in range(8):
            if segnum in entry.records:
                data = await self._read_disk(entry, segnum, lo, hi)
                if data is not None:
                    return data
                continue  # the disk copy was bad and is gone now
            held = self.memory.get(entry.name, segnum)
            if held is not None:
                self.memory_reads += 1
                return held[lo:hi]
            pending = state.inflight.get(segnum)
            if pending is None:
                break
            await pending.done.wait()
            if pending.data is not None:
                return pending.data[lo:hi]
        return (await self._fetch(entry, cap, segnum, store_later=True))[lo:hi]

    async def _read_disk(self, entry: Entry, segnum: int, lo: int, hi: int) -> bytes | None:
        """Bytes from the cache file, or None (and the segment forgotten) if they are not what was written."""
        if segnum not in entry.records or not self._open_files(entry, False):
            return None
        digest = entry.records.get(segnum)
        fd = entry.files.data_fd
        if digest is None or fd is None:
            return None
        start, stop = entry.span(segnum)
        data: bytes | None
        with self._index.busy(entry, segnum):
            try:
                if segnum in entry.verified:
                    data = pread_nowait(fd, hi - lo, start + lo) if hi - lo <= INLINE_READ_BYTES else None
                    if data is None:
                        data = await trio.to_thread.run_sync(os.pread, fd, hi - lo, start + lo)
                    if len(data) != hi - lo:
                        data = None
                else:
                    whole = await trio.to_thread.run_sync(pread_checked, fd, start, stop - start, digest)
                    data = None if whole is None else whole[lo:hi]
                    if whole is not None and entry.records.get(segnum) is digest:
                        entry.verified.add(segnum)
            except OSError as exc:
                log.warning("read cache: reading segment %d of %s failed: %s", segnum, entry.short, exc)
                data = None
        if data is None:
            if self._index.invalidate(entry, segnum, digest):
                log.warning("read cache: cached segment %d of %s is damaged; fetching it again", segnum, entry.short)
                entry.files.clear_slot(segnum)  # so the next run does not try it either
            return None
        self.disk_reads += 1
        return data

    # --- fetching and storing --------------------------------------------------------------------------------
    async def _fetch(self, entry: Entry, cap: ChkCap, segnum: int, *, store_later: bool = False) -> bytes:
        """Download one verified segment (others asking meanwhile wait for this one), then keep it.

        With `store_later` (a read is waiting) the disk write goes to a background task, so the read does not
        wait for it, up to MAX_BACKGROUND_STORES at once; past that the write is done here (backpressure).
        Until the write is done the segment stays in `inflight` with its bytes, so readers get them from there.
        """
        state = self._state(entry)
        pending = _Pending()
        state.inflight[segnum] = pending
        handed_off = False
        try:
            immutable = self._immutable(entry, cap)
            try:
                data = await immutable.segment(segnum)
            except LafsError:
                self._forget_immutable(entry, immutable)  # next time, look for the shares again
                raise
            start, stop = entry.span(segnum)
            if len(data) != stop - start:
                raise LafsError(f"segment {segnum} decoded to {len(data)} bytes, expected {stop - start}")
            self.segments_fetched += 1
            pending.data = data
            pending.done.set()  # waiters need not wait for the disk write
            if len(data) > self._index.max_bytes or entry.dropped:
                self.memory.put(entry.name, segnum, data)  # nothing to write: no need for a task
            elif store_later and self._background.accepting and self._store_slots.value > 0:
                self._store_slots.acquire_nowait()
                store = functools.partial(self._store_in_background, entry, segnum, pending, self._index.hold(entry))
                self._background.start_soon(store, cancellable=False)
                handed_off = True
            else:
                await self._store(entry, segnum, data)
            return data
        finally:
            if not handed_off:
                self._settle(state, segnum, pending)

    async def _store_in_background(self, entry: Entry, segnum: int, pending: _Pending, hold: Hold) -> None:
        """Owns a store slot (taken for it by `_fetch`) and a hold on the entry, both given back at the end."""
        with hold:
            try:
                assert pending.data is not None
                await self._store(entry, segnum, pending.data)
            except Exception:
                log.exception("read cache: storing segment %d of %s failed", segnum, entry.short)
            finally:
                self._store_slots.release()
                self._settle(self._state(entry), segnum, pending)

    @staticmethod
    def _settle(state: _Fetches, segnum: int, pending: _Pending) -> None:
        """The fetch is over (stored, or failed): later readers look on disk or in memory, or fetch anew."""
        if state.inflight.get(segnum) is pending:
            del state.inflight[segnum]
        pending.done.set()

    async def _store(self, entry: Entry, segnum: int, data: bytes) -> None:
        """Write a verified segment to disk if there is room, else keep it in the memory buffer."""
        if segnum in entry.records:
            return  # a second fetch of a segment already stored
        reservation = self._index.reserve(entry, len(data))
        if reservation is None:
            self.memory.put(entry.name, segnum, data)
            return
        digest: bytes | None = None
        with reservation:
            try:
                self._open_files(entry, True)
            except OSError as exc:
                log.warning("read cache: cannot create cache files for %s: %s", entry.short, exc)
                self.memory.put(entry.name, segnum, data)
                return
            files = entry.files
            assert files.data_fd is not None and files.meta_fd is not None and entry.segment_size is not None
            check = header_check(entry.identity, entry.segment_size)
            with self._index.busy(entry, segnum):
                try:
                    digest = await trio.to_thread.run_sync(
                        write_segment, files.data_fd, files.meta_fd, check, segnum, entry.span(segnum)[0], data
                    )
                except OSError as exc:
                    log.warning("read cache: cannot cache segment %d of %s: %s", segnum, entry.short, exc)
            if digest is not None:
                reservation.commit(segnum, digest)
        if digest is None or entry.dropped:
            self.memory.put(entry.name, segnum, data)

    # --- readahead -------------------------------------------------------------------------------------------
    def schedule_readahead(self, entry: Entry, cap: ChkCap, last: int) -> None:
        """Fetch the segments after `last` in the background, `readahead_bytes` worth, unless already here."""
        if not self._background.accepting or self.readahead_bytes == 0 or entry.dropped:
            return
        assert entry.segment_size is not None
        state = self._state(entry)
        count = -(-self.readahead_bytes // entry.segment_size)
        wanted = [
            segnum
            for segnum in range(last + 1, min(last + count, entry.num_segments - 1) + 1)
            if segnum not in entry.records
            and segnum not in state.inflight
            and segnum not in state.queued
            and (entry.name, segnum) not in self.memory
        ]
        if wanted:
            state.queued.update(wanted)
            readahead = functools.partial(self._readahead, entry, cap, wanted, self._index.hold(entry))
            self._background.start_soon(readahead, cancellable=True)

    async def _readahead(self, entry: Entry, cap: ChkCap, segnums: list[int], hold: Hold) -> None:
        with hold:
            try:
                async with trio.open_nursery() as nursery:
                    for segnum in segnums:
                        nursery.start_soon(self._readahead_one, entry, cap, segnum)
            finally:
                self._state(entry).queued.difference_update(segnums)

    async def _readahead_one(self, entry: Entry, cap: ChkCap, segnum: int) -> None:
        """Failures are only logged: the read that needs the segment will try again and report."""
        state = self._state(entry)
        try:
            async with state.readahead_limiter():
                state.queued.discard(segnum)
                if (
                    self._background.closed
                    or entry.dropped
                    or segnum in entry.records
                    or segnum in state.inflight
                    or (entry.name, segnum) in self.memory
                ):
                    return
                await self._fetch(entry, cap, segnum)
                self.readahead_fetched += 1
        except (LafsError, OSError) as exc:
            log.info("read cache: readahead of segment %d of %s failed: %s", segnum, entry.short, exc)
        except Exception:
            log.exception("read cache: readahead of segment %d of %s failed", segnum, entry.short)

    def _immutable(self, entry: Entry, cap: ChkCap) -> ImmutableFile:
        state = self._state(entry)
        if state.immutable is None:
            state.immutable = ImmutableFile(self.grid, cap)
        return state.immutable

    def _forget_immutable(self, entry: Entry, immutable: ImmutableFile) -> None:
        state = self._state(entry)
        if state.immutable is immutable:
            state.immutable = None
