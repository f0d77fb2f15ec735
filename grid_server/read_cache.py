"""The disk cache of downloaded file content: verified plaintext segments of CHK files, kept sparse on disk.

Why a cache: FUSE reads arrive in pieces of 4 KiB to 1 MiB, while the grid can only hand out whole verified
segments (1 MiB by default), so every segment a read touches is fetched once, kept, and later reads of the
same bytes are one `pread`. Content survives a remount, so a file read once is readable offline.

Layout, in the directory the caller gives (the daemon uses `private/blackmatch/cache/`, mode 0700):

    <SI>-<tag>.data   the file's plaintext at its natural offsets, sparse: only present segments are allocated
    <SI>-<tag>.meta   a 128-byte header (which file this is, its segment size), then one 48-byte slot per
                      segment: the SHA-256 of the segment's plaintext and a check binding it to the header
    lock              flock'ed while a ReadCache uses the directory (one user at a time)

`<SI>` is the storage index in base32 and `<tag>` a hash of the rest of the file's identity (UEB hash, k, N,
size), so two caps sharing a storage index never share an entry. The read key never appears in a name or a log
line. Files are created 0600.

Never wrong bytes. Only segments ImmutableFile has verified against the cap's hash trees are written. A segment
counts as present only once its slot is valid, and the slot is written after the data; a torn slot fails its
check and reads as absent, and a damaged header discards the whole entry. Nothing is fsynced, so after a power
loss a slot may survive while the data it describes did not; therefore a segment found on disk is checked
against its slot's SHA-256 the first time this process reads it (one whole-segment read and hash per segment
per run), and one that fails is dropped and fetched again. Segments this process wrote itself are trusted for
the rest of the run; a short read (file truncated underneath us) also sends the segment back to the grid.

Eviction keeps the bytes of present segments under `max_bytes`: whole files, least recently read first,
skipping files with reads or fetches in flight; if that is not enough (one file alone is bigger than the cache,
say a film being streamed), single segments of the files in use are dropped by punching holes, those behind
the reader's position first, never one being read or written. A segment that cannot get room is kept in a
small in-memory buffer instead, which is also all there is when `max_bytes` is 0.

Reads that continue where the previous read of the same file ended start a background readahead of the next
`readahead_bytes` worth of segments; concurrent reads of one segment share one fetch. A segment fetched for a
waiting read is handed to the reader at once and written to disk by a background task (a few at a time), so
disk writes add no latency to cold reads. Large disk reads and writes, and the hashing, run in worker threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trio

from lafs_core import base32
from lafs_core.caps import ChkCap, LiteralCap
from lafs_core.errors import LafsError
from lafs_core.grid.download import ImmutableFile
from lafs_core.grid.grid import Grid

from .disk_space import punch_hole

log = logging.getLogger("blackmatch.read_cache")

DEFAULT_READAHEAD_BYTES = 8 * 1024 * 1024
DEFAULT_FETCH_CONCURRENCY = 4
DEFAULT_MAX_OPEN_FILES = 64
DEFAULT_MEMORY_BYTES = 16 * 1024 * 1024

INLINE_READ_BYTES = 256 * 1024
"""Reads of verified cached data up to this size are first tried on the trio thread with RWF_NOWAIT, which
copies from the page cache or refuses at once (EAGAIN) instead of waiting for the disk; only a refusal goes to
a worker thread. Measured on the 2-core dev VM: 4 KiB reads 15 us inline vs 360 us through a worker thread,
128 KiB 47 vs 142 us, but 1 MiB 1.2 ms vs 0.66 ms (the copy dominates and the thread path copies once).
A segment is usually in the page cache: it was just written, or read whole to check it on its first read."""

MAX_BACKGROUND_STORES = 4
"""Segments fetched for a waiting read whose disk writes may still be running after the read returned."""

MAGIC = b"BMRCACH1"
_HEADER = struct.Struct(">8s16s32sHHQQ")
HEADER_SIZE = 128
DIGEST_SIZE = 32
CHECK_SIZE = 16
SLOT_SIZE = DIGEST_SIZE + CHECK_SIZE
_EMPTY_SLOT = bytes(SLOT_SIZE)


class CacheInUseError(RuntimeError):
    """Another ReadCache (in this process or another) holds the cache directory."""


@dataclass
class ReadCacheStats:
    """Counters for logs, tests and benchmarks."""

    segments_fetched: int = 0  # segments downloaded from the grid, foreground and readahead
    readahead_fetched: int = 0  # of which by readahead
    disk_reads: int = 0  # segment pieces served from the disk cache
    memory_reads: int = 0  # segment pieces served from the in-memory buffer
    discarded_segments: int = 0  # cached segments that failed their check (or vanished) and were dropped
    evicted_files: int = 0
    evicted_segments: int = 0


@dataclass(frozen=True)
class _Identity:
    """What pins a CHK file's content: the same identity always means the same plaintext."""

    storage_index: bytes
    ueb_hash: bytes
    needed: int
    total: int
    size: int

    @classmethod
    def of(cls, cap: ChkCap) -> _Identity:
        return _identity_of(cap)

    @property
    def name(self) -> str:
        return _entry_name(self)


@functools.lru_cache(maxsize=1024)
def _identity_of(cap: ChkCap) -> _Identity:
    """Cached: deriving the storage index from the key is a hash, and every read needs it."""
    return _Identity(cap.storage_index, cap.ueb_hash, cap.needed, cap.total, cap.size)


@functools.lru_cache(maxsize=1024)
def _entry_name(identity: _Identity) -> str:
    """`<storage index>-<tag>`: the tag (a hash of the rest of the identity) keeps caps sharing an SI apart."""
    packed = struct.pack(
        ">16s32sHHQ", identity.storage_index, identity.ueb_hash, identity.needed, identity.total, identity.size
    )
    tag = hashlib.sha256(b"blackmatch read-cache entry v1:" + packed).digest()[:10]
    return f"{base32.encode(identity.storage_index)}-{base32.encode(tag)}"


def _pack_header(identity: _Identity, segment_size: int) -> tuple[bytes, bytes]:
    """The meta file's header and its check value (which every slot is bound to)."""
    body = _HEADER.pack(
        MAGIC,
        identity.storage_index,
        identity.ueb_hash,
        identity.needed,
        identity.total,
        identity.size,
        segment_size,
    )
    check = hashlib.sha256(b"blackmatch read-cache header:" + body).digest()[:CHECK_SIZE]
    return (body + check).ljust(HEADER_SIZE, b"\0"), check


def _parse_header(raw: bytes) -> tuple[_Identity, int, bytes] | None:
    """(identity, segment size, check) from a meta file's first bytes, or None if they are not a good header."""
    if len(raw) < HEADER_SIZE:
        return None
    body, check = raw[: _HEADER.size], raw[_HEADER.size : _HEADER.size + CHECK_SIZE]
    if hashlib.sha256(b"blackmatch read-cache header:" + body).digest()[:CHECK_SIZE] != check:
        return None
    magic, si, ueb_hash, needed, total, size, segment_size = _HEADER.unpack(body)
    if magic != MAGIC or not (1 <= needed <= total <= 256) or size < 1 or segment_size < 1:
        return None
    return _Identity(si, ueb_hash, needed, total, size), segment_size, check


def _slot(header_check: bytes, segnum: int, digest: bytes) -> bytes:
    check = hashlib.sha256(header_check + segnum.to_bytes(8, "big") + digest).digest()[:CHECK_SIZE]
    return digest + check


def _slot_digest(header_check: bytes, segnum: int, raw: bytes) -> bytes | None:
    """The segment digest a slot records, or None for an empty, torn or foreign slot."""
    if len(raw) != SLOT_SIZE or raw == _EMPTY_SLOT:
        return None
    digest = raw[:DIGEST_SIZE]
    return digest if _slot(header_check, segnum, digest) == raw else None


def _slot_offset(segnum: int) -> int:
    return HEADER_SIZE + SLOT_SIZE * segnum


def _segment_span(segment_size: int, size: int, segnum: int) -> tuple[int, int]:
    start = segnum * segment_size
    return start, min(start + segment_size, size)


def _write_segment(data_fd: int, meta_fd: int, header_check: bytes, segnum: int, offset: int, data: bytes) -> bytes:
    """Data first, then its slot: a crash in between leaves the segment absent. Returns the data's digest."""
    digest = hashlib.sha256(data).digest()
    view = memoryview(data)
    written = 0
    while written < len(data):
        n = os.pwrite(data_fd, view[written:], offset + written)
        if n <= 0:
            raise OSError(28, "short write to the cache file")
        written += n
    slot = _slot(header_check, segnum, digest)
    if os.pwrite(meta_fd, slot, _slot_offset(segnum)) != SLOT_SIZE:
        raise OSError(28, "short write to the cache metadata")
    return digest


def _pread_nowait(fd: int, length: int, offset: int) -> bytes | None:
    """The bytes if the page cache holds all of them (never waits for the disk); None otherwise."""
    global _nowait_supported
    if not _nowait_supported:
        return None
    buffer = bytearray(length)
    try:
        n = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except (OSError, AttributeError, ValueError):
        _nowait_supported = False  # an old kernel or a file system without it: always use a worker thread
        return None
    return bytes(buffer) if n == length else None


_nowait_supported = hasattr(os, "RWF_NOWAIT")


def _pread_checked(fd: int, offset: int, length: int, digest: bytes) -> bytes | None:
    """A whole segment from disk if it is all there and matches its recorded digest."""
    data = os.pread(fd, length, offset)
    if len(data) != length or hashlib.sha256(data).digest() != digest:
        return None
    return data


@dataclass
class _Scanned:
    """An entry found on disk at start-up (built in a worker thread, so no trio objects)."""

    name: str
    identity: _Identity
    segment_size: int
    header_check: bytes
    records: dict[int, bytes]
    mtime_ns: int


class _Pending:
    """One in-flight fetch of a segment, which concurrent readers of that segment wait on."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None


@dataclass(eq=False)
class _Entry:
    """The cache's state for one file: what is on disk, what is in flight, who is using it."""

    identity: _Identity
    name: str
    fetch_concurrency: int
    segment_size: int | None = None
    header_check: bytes = b""
    records: dict[int, bytes] = field(default_factory=dict)  # segnum -> SHA-256 of the plaintext on disk
    verified: set[int] = field(default_factory=set)  # segments checked against their digest (or written) this run
    bytes: int = 0  # present segments plus space reserved for segments being written
    users: int = 0  # reads and readahead tasks in progress
    busy: Counter[int] = field(default_factory=Counter)  # segments being read from or written to disk right now
    inflight: dict[int, _Pending] = field(default_factory=dict)
    queued: set[int] = field(default_factory=set)  # readahead segments waiting for their turn
    on_disk: bool = False  # the .data and .meta files exist with a good header
    data_fd: int | None = None
    meta_fd: int | None = None
    immutable: ImmutableFile | None = None
    dropped: bool = False
    last_end: int | None = None
    last_access_ns: int = 0
    limiter: trio.CapacityLimiter | None = None

    @property
    def short(self) -> str:
        """Enough of the storage index to tell files apart in a log line."""
        return self.name[:10]

    @property
    def num_segments(self) -> int:
        assert self.segment_size is not None
        return -(-self.identity.size // self.segment_size)

    def span(self, segnum: int) -> tuple[int, int]:
        assert self.segment_size is not None
        return _segment_span(self.segment_size, self.identity.size, segnum)

    def readahead_limiter(self) -> trio.CapacityLimiter:
        if self.limiter is None:
            self.limiter = trio.CapacityLimiter(self.fetch_concurrency)
        return self.limiter


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
        self.grid = grid
        self.max_bytes = max_bytes
        self.readahead_bytes = readahead_bytes
        self.fetch_concurrency = fetch_concurrency
        self.max_open_files = max_open_files
        self.memory_bytes = memory_bytes
        self.stats = ReadCacheStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently read first
        self._open: OrderedDict[str, _Entry] = OrderedDict()  # recently read: may hold fds and an ImmutableFile
        self._total = 0
        self._memory: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._memory_total = 0
        self._lock_fd: int | None = None
        self._nursery_manager: contextlib.AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._punch_supported = True
        self._store_slots = trio.Semaphore(MAX_BACKGROUND_STORES)
        self._background = 0  # readahead and store tasks running
        self._readahead_scopes: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()

    # --- life cycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> ReadCache:
        if self._nursery is not None or self._closed:
            raise RuntimeError("a ReadCache is entered once")
        scanned = await trio.to_thread.run_sync(self._prepare_directory)
        for found in sorted(scanned, key=lambda s: s.mtime_ns):
            entry = _Entry(found.identity, found.name, self.fetch_concurrency, found.segment_size, found.header_check)
            entry.records = found.records
            entry.on_disk = True
            entry.last_access_ns = found.mtime_ns
            for segnum in found.records:
                start, end = entry.span(segnum)
                entry.bytes += end - start
            self._entries[entry.name] = entry
            self._total += entry.bytes
        self._make_room(0)  # the limit may be smaller than last time
        manager = trio.open_nursery()
        self._nursery = await manager.__aenter__()
        self._nursery_manager = manager
        log.info("read cache: %d files, %d bytes cached (limit %d)", len(self._entries), self._total, self.max_bytes)
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
        if self._nursery is not None and self._nursery_manager is not None:
            for scope in list(self._readahead_scopes):
                scope.cancel()
            await self._nursery_manager.__aexit__(None, None, None)
        touched = [(self._meta_path(e.name), e.last_access_ns) for e in self._entries.values() if e.on_disk]
        for entry in list(self._open.values()):
            if entry.users == 0:
                self._close_files(entry)
        self._memory.clear()
        self._memory_total = 0

        def finish() -> None:
            for path, ns in touched:
                with contextlib.suppress(OSError):
                    os.utime(path, ns=(ns, ns))
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock

        with trio.CancelScope(shield=True):  # closing under cancellation must still release the lock
            await trio.to_thread.run_sync(finish)
        self._lock_fd = None

    def _prepare_directory(self) -> list[_Scanned]:
        """Create the directory 0700, take its lock, and load every good entry (discarding bad ones)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise CacheInUseError(f"cache directory {self.directory} is in use by another read cache") from None
        try:
            found = self._scan()
        except BaseException:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        return found

    def _scan(self) -> list[_Scanned]:
        names = os.listdir(self.directory)
        metas = {n[: -len(".meta")] for n in names if n.endswith(".meta")}
        datas = {n[: -len(".data")] for n in names if n.endswith(".data")}
        found: list[_Scanned] = []
        for stem in sorted(metas | datas):
            entry = self._load_entry(stem) if stem in metas and stem in datas else None
            if entry is None:
                log.info("read cache: discarding unusable entry %s", stem[:10])
                for suffix in (".data", ".meta"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.directory / (stem + suffix))
            else:
                found.append(entry)
        return found

    def _load_entry(self, stem: str) -> _Scanned | None:
        """One entry from disk, its slots checked; None if the header is bad or belongs to another name."""
        try:
            meta = (self.directory / (stem + ".meta")).read_bytes()
            data_size = os.stat(self.directory / (stem + ".data")).st_size
            mtime_ns = os.stat(self.directory / (stem + ".meta")).st_mtime_ns
        except OSError:
            return None
        parsed = _parse_header(meta)
        if parsed is None:
            return None
        identity, segment_size, check = parsed
        if identity.name != stem:
            return None
        records: dict[int, bytes] = {}
        slots = min(-(-identity.size // segment_size), max(0, (len(meta) - HEADER_SIZE) // SLOT_SIZE))
        for segnum in range(slots):
            raw = meta[_slot_offset(segnum) : _slot_offset(segnum) + SLOT_SIZE]
            digest = _slot_digest(check, segnum, raw)
            if digest is not None and _segment_span(segment_size, identity.size, segnum)[1] <= data_size:
                records[segnum] = digest
        if not records:
            return None
        return _Scanned(stem, identity, segment_size, check, records, mtime_ns)

    def _data_path(self, name: str) -> Path:
        return self.directory / (name + ".data")

    def _meta_path(self, name: str) -> Path:
        return self.directory / (name + ".meta")

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
        if self._nursery is None or self._closed:
            raise RuntimeError("ReadCache is not open (use `async with ReadCache(...)`)")
        end = min(offset + size, cap.size)
        if offset >= end:
            return b""
        entry = self._use_entry(cap)
        sequential = entry.last_end == offset
        entry.last_end = end
        try:
            segment_size = await self._segment_size(entry, cap)
            first, last = offset // segment_size, (end - 1) // segment_size
            if sequential:
                self._schedule_readahead(entry, cap, last)
            if first == last:
                base = first * segment_size
                return await self._segment_bytes(entry, cap, first, offset - base, end - base)
            return await self._read_segments(entry, cap, offset, end, first, last)
        finally:
            self._release(entry)

    async def wait_idle(self) -> None:
        """Wait until readahead and background disk writes started so far are done (tests, benchmarks)."""
        while self._background:
            await self._idle.wait()

    def cached_bytes(self) -> int:
        """Bytes of plaintext held on disk (present segments), the quantity kept under `max_bytes`."""
        return self._total

    def cached_segments(self, cap: ChkCap) -> list[int]:
        """Segment numbers of this file present on disk."""
        entry = self._entries.get(_Identity.of(cap).name)
        return sorted(entry.records) if entry is not None else []

    def drop(self, cap: ChkCap | LiteralCap) -> None:
        """Forget one file's cached content (reads in progress finish from what they already opened)."""
        if isinstance(cap, LiteralCap):
            return
        name = _Identity.of(cap).name
        entry = self._entries.get(name)
        if entry is not None:
            self._discard(entry)
        self._forget_memory(name)

    def clear(self) -> None:
        """Forget everything cached."""
        for entry in list(self._entries.values()):
            self._discard(entry)
        self._memory.clear()
        self._memory_total = 0

    # --- reading ---------------------------------------------------------------------------------------------
    def _use_entry(self, cap: ChkCap) -> _Entry:
        """The file's entry (made if new), marked most recently used and held (`_release` when done)."""
        identity = _Identity.of(cap)
        name = identity.name
        entry = self._entries.get(name)
        if entry is not None and entry.identity != identity:  # only on a SHA-256 collision; never serve it
            self._discard(entry)
            entry = None
        if entry is None:
            entry = _Entry(identity, name, self.fetch_concurrency)
            self._entries[name] = entry
        else:
            self._entries.move_to_end(name)
        entry.last_access_ns = time.time_ns()
        entry.users += 1
        self._note_open(entry)
        return entry

    async def _segment_size(self, entry: _Entry, cap: ChkCap) -> int:
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

    async def _read_segments(self, entry: _Entry, cap: ChkCap, offset: int, end: int, first: int, last: int) -> bytes:
        """A read spanning several segments: up to `fetch_concurrency` of them at once, first error wins."""
        assert entry.segment_size is not None
        pieces: list[bytes] = [b""] * (last - first + 1)
        errors: list[Exception] = []
        limiter = trio.CapacityLimiter(self.fetch_concurrency)

        async def one(segnum: int, nursery: trio.Nursery) -> None:
            start, stop = entry.span(segnum)
            try:
                async with limiter:
                    pieces[segnum - first] = await self._segment_bytes(
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

    async def _segment_bytes(self, entry: _Entry, cap: ChkCap, segnum: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of one segment: from disk, from memory, from a fetch in flight, or fetched now.

        A fetch that fails wakes its waiters, and the first of them to look again fetches in turn (the others
        wait on that one): each task fetches at most once, so one ChkReader never runs two fetches of one
        segment at a time (its truncation check would blame good shares).
        """
        for _attempt in range(8):
            if segnum in entry.records:
                data = await self._read_disk(entry, segnum, lo, hi)
                if data is not None:
                    return data
                continue  # the disk copy was bad and is gone now
            held = self._memory.get((entry.name, segnum))
            if held is not None:
                self._memory.move_to_end((entry.name, segnum))
                self.stats.memory_reads += 1
                return held[lo:hi]
            pending = entry.inflight.get(segnum)
            if pending is None:
                break
            await pending.done.wait()
            if pending.data is not None:
                return pending.data[lo:hi]
        return (await self._fetch(entry, cap, segnum, store_later=True))[lo:hi]

    async def _read_disk(self, entry: _Entry, segnum: int, lo: int, hi: int) -> bytes | None:
        """Bytes from the cache file, or None (and the segment forgotten) if they are not what was written."""
        if segnum not in entry.records or not self._ensure_files(entry, create=False):
            return None
        digest = entry.records.get(segnum)
        if digest is None or entry.data_fd is None:
            return None
        start, stop = entry.span(segnum)
        fd = entry.data_fd
        entry.busy[segnum] += 1
        try:
            if segnum in entry.verified:
                data: bytes | None = _pread_nowait(fd, hi - lo, start + lo) if hi - lo <= INLINE_READ_BYTES else None
                if data is None:
                    data = await trio.to_thread.run_sync(os.pread, fd, hi - lo, start + lo)
                if len(data) != hi - lo:
                    data = None
            else:
                whole = await trio.to_thread.run_sync(_pread_checked, fd, start, stop - start, digest)
                data = None if whole is None else whole[lo:hi]
                if whole is not None and entry.records.get(segnum) is digest:
                    entry.verified.add(segnum)
        except OSError as exc:
            log.warning("read cache: reading segment %d of %s failed: %s", segnum, entry.short, exc)
            data = None
        finally:
            self._unbusy(entry, segnum)
        if data is None:
            self._invalidate(entry, segnum, digest)
            return None
        self.stats.disk_reads += 1
        return data

    async def _fetch(self, entry: _Entry, cap: ChkCap, segnum: int, *, store_later: bool = False) -> bytes:
        """Download one verified segment (others asking meanwhile wait for this one), then keep it.

        With `store_later` (a read is waiting) the disk write goes to a background task, so the read does not
        wait for it, up to MAX_BACKGROUND_STORES at once; past that the write is done here (backpressure).
        Until the write is done the segment stays in `inflight` with its bytes, so readers get them from there.
        """
        pending = _Pending()
        entry.inflight[segnum] = pending
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
            self.stats.segments_fetched += 1
            pending.data = data
            pending.done.set()  # waiters need not wait for the disk write
            if len(data) > self.max_bytes or entry.dropped:
                self._remember(entry.name, segnum, data)  # nothing to write: no need for a task
            elif store_later and self._nursery is not None and not self._closed and self._store_slots.value > 0:
                self._store_slots.acquire_nowait()
                entry.users += 1
                self._start_background(self._store_in_background, entry, segnum, pending)
                handed_off = True
            else:
                await self._store(entry, segnum, data)
            return data
        finally:
            if not handed_off:
                self._settle(entry, segnum, pending)

    async def _store_in_background(self, entry: _Entry, segnum: int, pending: _Pending) -> None:
        try:
            assert pending.data is not None
            await self._store(entry, segnum, pending.data)
        except Exception:
            log.exception("read cache: storing segment %d of %s failed", segnum, entry.short)
        finally:
            self._store_slots.release()
            self._settle(entry, segnum, pending)
            self._release(entry)
            self._end_background()

    def _start_background(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None
        if self._background == 0:
            self._idle = trio.Event()
        self._background += 1
        self._nursery.start_soon(fn, *args)

    def _end_background(self) -> None:
        self._background -= 1
        if self._background == 0:
            self._idle.set()

    @staticmethod
    def _settle(entry: _Entry, segnum: int, pending: _Pending) -> None:
        """The fetch is over (stored, or failed): later readers look on disk or in memory, or fetch anew."""
        if entry.inflight.get(segnum) is pending:
            del entry.inflight[segnum]
        pending.done.set()

    async def _store(self, entry: _Entry, segnum: int, data: bytes) -> None:
        """Write a verified segment to disk if there is room, else keep it in the memory buffer."""
        n = len(data)
        if segnum in entry.records:
            return  # a second fetch of a segment already stored
        if entry.dropped or n == 0 or not self._make_room(n):
            self._remember(entry.name, segnum, data)
            return
        try:
            self._ensure_files(entry, create=True)
        except OSError as exc:
            log.warning("read cache: cannot create cache files for %s: %s", entry.short, exc)
            self._remember(entry.name, segnum, data)
            return
        assert entry.data_fd is not None and entry.meta_fd is not None
        entry.bytes += n  # reserve the room before yielding
        self._total += n
        entry.busy[segnum] += 1
        digest: bytes | None = None
        try:
            digest = await trio.to_thread.run_sync(
                _write_segment, entry.data_fd, entry.meta_fd, entry.header_check, segnum, entry.span(segnum)[0], data
            )
        except OSError as exc:
            log.warning("read cache: cannot cache segment %d of %s: %s", segnum, entry.short, exc)
        finally:
            self._unbusy(entry, segnum)
            if digest is not None and not entry.dropped and segnum not in entry.records:
                entry.records[segnum] = digest
                entry.verified.add(segnum)
            elif not entry.dropped:
                entry.bytes -= n
                self._total -= n
        if digest is None or entry.dropped:
            self._remember(entry.name, segnum, data)

    # --- readahead ---------------------------------------------------------------------------------------
    def _schedule_readahead(self, entry: _Entry, cap: ChkCap, last: int) -> None:
        """Fetch the segments after `last` in the background, `readahead_bytes` worth, unless already here."""
        if self._nursery is None or self._closed or self.readahead_bytes == 0 or entry.dropped:
            return
        assert entry.segment_size is not None
        count = -(-self.readahead_bytes // entry.segment_size)
        wanted = [
            segnum
            for segnum in range(last + 1, min(last + count, entry.num_segments - 1) + 1)
            if segnum not in entry.records
            and segnum not in entry.inflight
            and segnum not in entry.queued
            and (entry.name, segnum) not in self._memory
        ]
        if wanted:
            entry.queued.update(wanted)
            entry.users += 1
            self._start_background(self._readahead, entry, cap, wanted)

    async def _readahead(self, entry: _Entry, cap: ChkCap, segnums: list[int]) -> None:
        scope = trio.CancelScope()
        self._readahead_scopes.add(scope)
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for segnum in segnums:
                        nursery.start_soon(self._readahead_one, entry, cap, segnum)
        finally:
            self._readahead_scopes.discard(scope)
            entry.queued.difference_update(segnums)
            self._release(entry)
            self._end_background()

    async def _readahead_one(self, entry: _Entry, cap: ChkCap, segnum: int) -> None:
        """Failures are only logged: the read that needs the segment will try again and report."""
        try:
            async with entry.readahead_limiter():
                entry.queued.discard(segnum)
                if (
                    self._closed
                    or entry.dropped
                    or segnum in entry.records
                    or segnum in entry.inflight
                    or (entry.name, segnum) in self._memory
                ):
                    return
                await self._fetch(entry, cap, segnum)
                self.stats.readahead_fetched += 1
        except (LafsError, OSError) as exc:
            log.info("read cache: readahead of segment %d of %s failed: %s", segnum, entry.short, exc)
        except Exception:
            log.exception("read cache: readahead of segment %d of %s failed", segnum, entry.short)

    # --- files, handles and bookkeeping ------------------------------------------------------------------
    def _immutable(self, entry: _Entry, cap: ChkCap) -> ImmutableFile:
        if entry.immutable is None:
            entry.immutable = ImmutableFile(self.grid, cap)
        return entry.immutable

    def _forget_immutable(self, entry: _Entry, immutable: ImmutableFile) -> None:
        if entry.immutable is immutable:
            entry.immutable = None

    def _ensure_files(self, entry: _Entry, create: bool) -> bool:
        """Open (or, with `create`, make) the entry's files; False if they are not there.

        Runs on the trio thread, between two checkpoints, so no other task can drop the entry or make
        files of the same name in the middle: a dropped entry never touches the paths again.
        """
        if entry.data_fd is not None:
            return True
        if entry.dropped:
            return False
        data_path, meta_path = self._data_path(entry.name), self._meta_path(entry.name)
        if entry.on_disk:
            try:
                data_fd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    meta_fd = os.open(meta_path, os.O_RDWR | os.O_CLOEXEC)
                except OSError:
                    os.close(data_fd)
                    raise
            except OSError as exc:
                log.warning("read cache: files of %s are gone (%s); fetching again", entry.short, exc)
                self._forget_records(entry)
                entry.on_disk = False
            else:
                entry.data_fd, entry.meta_fd = data_fd, meta_fd
                return True
        if not create:
            return False
        assert entry.segment_size is not None
        header, check = _pack_header(entry.identity, entry.segment_size)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        data_fd = os.open(data_path, flags, 0o600)
        try:
            meta_fd = os.open(meta_path, flags, 0o600)
            try:
                os.fchmod(data_fd, 0o600)
                os.fchmod(meta_fd, 0o600)
                os.pwrite(meta_fd, header, 0)
            except OSError:
                os.close(meta_fd)
                raise
        except OSError:
            os.close(data_fd)
            for path in (data_path, meta_path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        entry.data_fd, entry.meta_fd, entry.header_check, entry.on_disk = data_fd, meta_fd, check, True
        return True

    def _close_files(self, entry: _Entry) -> None:
        for fd in (entry.data_fd, entry.meta_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        entry.data_fd = entry.meta_fd = None
        entry.immutable = None
        if self._open.get(entry.name) is entry:
            del self._open[entry.name]

    def _note_open(self, entry: _Entry) -> None:
        """Mark the entry recently used; close the least recently used idle ones past `max_open_files`."""
        self._open[entry.name] = entry
        self._open.move_to_end(entry.name)
        self._trim_open()

    def _trim_open(self) -> None:
        while len(self._open) > self.max_open_files:
            victim = next((e for e in self._open.values() if e.users == 0), None)
            if victim is None:
                return
            self._close_files(victim)
            if victim.bytes == 0 and self._entries.get(victim.name) is victim:
                self._discard(victim)  # nothing cached: not worth an index entry (or empty files)

    def _release(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0:
            if entry.dropped or self._closed:
                self._close_files(entry)
            else:
                self._trim_open()

    def _unbusy(self, entry: _Entry, segnum: int) -> None:
        entry.busy[segnum] -= 1
        if entry.busy[segnum] <= 0:
            del entry.busy[segnum]

    def _forget_records(self, entry: _Entry) -> None:
        if not entry.dropped:
            present = sum(entry.span(s)[1] - entry.span(s)[0] for s in entry.records)
            entry.bytes -= present
            self._total -= present
        self.stats.discarded_segments += len(entry.records)
        entry.records.clear()
        entry.verified.clear()

    def _invalidate(self, entry: _Entry, segnum: int, digest: bytes) -> None:
        """A cached segment turned out bad: forget it (slot cleared first) so the next read fetches it."""
        if entry.records.get(segnum) is not digest:
            return  # already forgotten (or replaced) by someone else
        log.warning("read cache: cached segment %d of %s is damaged; fetching it again", segnum, entry.short)
        del entry.records[segnum]
        entry.verified.discard(segnum)
        self.stats.discarded_segments += 1
        if not entry.dropped:
            start, stop = entry.span(segnum)
            entry.bytes -= stop - start
            self._total -= stop - start
        if entry.meta_fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(entry.meta_fd, _EMPTY_SLOT, _slot_offset(segnum))

    def _discard(self, entry: _Entry) -> None:
        """Remove an entry from the index and its files from the directory; open handles keep working."""
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        if not entry.dropped:
            self._total -= entry.bytes
        entry.dropped = True
        entry.bytes = 0
        entry.records.clear()
        entry.verified.clear()
        if entry.on_disk:
            for path in (self._data_path(entry.name), self._meta_path(entry.name)):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            entry.on_disk = False
        if entry.users == 0:
            self._close_files(entry)

    def _make_room(self, need: int) -> bool:
        """Evict until `need` more bytes fit under max_bytes; False if they cannot."""
        if need > self.max_bytes:
            return False
        limit = self.max_bytes - need
        if self._total <= limit:
            return True
        for entry in list(self._entries.values()):  # whole idle files, least recently read first
            if self._total <= limit:
                return True
            if entry.users == 0 and entry.bytes > 0:
                log.debug("read cache: evicting %s (%d bytes)", entry.short, entry.bytes)
                self._discard(entry)
                self.stats.evicted_files += 1
        if self._punch_supported:
            for entry in list(self._entries.values()):  # then segments of files in use, away from their readers
                for segnum in self._punch_order(entry):
                    if self._total <= limit:
                        return True
                    if not self._punch(entry, segnum):
                        return self._total <= limit
        return self._total <= limit

    def _punch_order(self, entry: _Entry) -> list[int]:
        """Segments behind the reader (oldest first), then those ahead (farthest first); none being used."""
        if not entry.records or entry.segment_size is None:
            return []
        position = (entry.last_end or 0) // entry.segment_size
        idle = [s for s in entry.records if s not in entry.busy]
        behind = sorted(s for s in idle if s < position)
        ahead = sorted((s for s in idle if s >= position), reverse=True)
        return behind + ahead

    def _punch(self, entry: _Entry, segnum: int) -> bool:
        """Drop one segment: free its blocks, then clear its slot (the digest check covers a crash between)."""
        if not self._ensure_files(entry, create=False) or segnum not in entry.records:
            return True
        assert entry.data_fd is not None and entry.meta_fd is not None
        start, stop = entry.span(segnum)
        try:
            punch_hole(entry.data_fd, start, stop - start)
        except OSError as exc:
            log.warning("read cache: cannot punch holes in cache files (%s); evicting whole files only", exc)
            self._punch_supported = False
            return False
        del entry.records[segnum]
        entry.verified.discard(segnum)
        entry.bytes -= stop - start
        self._total -= stop - start
        self.stats.evicted_segments += 1
        with contextlib.suppress(OSError):
            os.pwrite(entry.meta_fd, _EMPTY_SLOT, _slot_offset(segnum))
        return True

    def _remember(self, name: str, segnum: int, data: bytes) -> None:
        """Keep a segment that could not go to disk in the bounded memory buffer (readahead, max_bytes=0)."""
        key = (name, segnum)
        if key in self._memory or len(data) > self.memory_bytes:
            return
        self._memory[key] = data
        self._memory_total += len(data)
        while self._memory_total > self.memory_bytes:
            _key, old = self._memory.popitem(last=False)
            self._memory_total -= len(old)

    def _forget_memory(self, name: str) -> None:
        for key in [k for k in self._memory if k[0] == name]:
            self._memory_total -= len(self._memory.pop(key))
