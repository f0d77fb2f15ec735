"""The read cache's index: which segments of which files are on disk, how many bytes that is, what to evict.

All size accounting happens here, so that one `check()` can say whether it adds up: an entry's `bytes` is the
size of its present segments plus the room reserved for segments being written, and the index's total is the
sum over its entries, kept under `max_bytes`. Nothing here touches the disk: eviction asks callbacks to
remove an entry's files or punch a segment out of them, so the policy is tested against a model on its own.

Eviction drops whole files, least recently read first, skipping files that are held (reads or fetches in
flight); if that is not enough (one file alone is bigger than the cache, say a film being streamed), single
segments of the held files are dropped, those behind the reader's position first, never one being read or
written. Holds and busy segments are context managers, so no code path counts them up and down by hand.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

from .read_cache_files import EntryFiles
from .read_cache_format import Identity, segment_count, segment_span

log = logging.getLogger("blackmatch.read_cache")


@dataclass(eq=False)
class Entry:
    """The cache's state for one file: what is on disk and who is using it. Sizes change only in CacheIndex."""

    identity: Identity
    files: EntryFiles
    segment_size: int | None = None
    records: dict[int, bytes] = field(default_factory=dict)  # segnum -> SHA-256 of the plaintext on disk
    verified: set[int] = field(default_factory=set)  # segments checked against their digest (or written) this run
    bytes: int = 0  # present segments plus `reserved`
    reserved: int = 0  # room taken for segments being written
    users: int = 0  # holds: reads and background tasks in progress
    busy: Counter[int] = field(default_factory=Counter)  # segments being read from or written to disk right now
    dropped: bool = False  # out of the index for good: never written to again
    last_end: int | None = None  # where the last read ended: sequential reads and punch order
    last_access_ns: int = 0

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def short(self) -> str:
        """Enough of the storage index to tell files apart in a log line."""
        return self.name[:10]

    @property
    def num_segments(self) -> int:
        assert self.segment_size is not None
        return segment_count(self.segment_size, self.identity.size)

    def span(self, segnum: int) -> tuple[int, int]:
        assert self.segment_size is not None
        return segment_span(self.segment_size, self.identity.size, segnum)

    def span_size(self, segnum: int) -> int:
        start, stop = self.span(segnum)
        return stop - start


class Hold:
    """One user of an entry (a read, a readahead or a disk write): held entries are never evicted whole.

    Taken at once (so a task can be handed a hold before it starts) and released exactly once, by leaving
    `with hold:`; the index is told when the last hold of an entry goes.
    """

    def __init__(self, index: CacheIndex, entry: Entry) -> None:
        self._index = index
        self.entry = entry
        self._held = True
        entry.users += 1

    def __enter__(self) -> Entry:
        return self.entry

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._held:
            self._held = False
            self.entry.users -= 1
            if self.entry.users == 0:
                self._index.on_idle(self.entry)


class Reservation:
    """Room for one segment being written; leaving `with` without `commit` gives the room back."""

    def __init__(self, index: CacheIndex, entry: Entry, size: int) -> None:
        self._index = index
        self._entry = entry
        self.size = size
        self._open = True
        index._add_bytes(entry, size)
        entry.reserved += size

    def __enter__(self) -> Reservation:
        return self

    def commit(self, segnum: int, digest: bytes) -> bool:
        """The segment is written: it becomes present (unless dropped or already present meanwhile)."""
        entry = self._entry
        if not self._open or entry.dropped or segnum in entry.records:
            return False
        self._open = False
        entry.reserved -= self.size
        entry.records[segnum] = digest
        entry.verified.add(segnum)
        return True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._open:
            self._open = False
            if not self._entry.dropped:  # a dropped entry gave back all its bytes already
                self._entry.reserved -= self.size
                self._index._add_bytes(self._entry, -self.size)


class CacheIndex:
    """The cached files, least recently read first, and the bytes they hold on disk."""

    def __init__(
        self,
        max_bytes: int,
        *,
        remove: Callable[[Entry], None],
        punch: Callable[[Entry, int], bool],
        on_idle: Callable[[Entry], None],
    ) -> None:
        """`remove` deletes an entry's files (holders keep their descriptors); `punch` frees one present
        segment's disk blocks and clears its slot, False if the file system cannot; `on_idle` hears that an
        entry's last hold went."""
        self.max_bytes = max_bytes
        self._remove = remove
        self._punch = punch
        self.on_idle = on_idle
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._total = 0
        self._punch_supported = True
        self.evicted_files = 0
        self.evicted_segments = 0
        self.discarded_segments = 0  # segments that failed their check (or vanished) and were forgotten

    @property
    def total(self) -> int:
        """Bytes of present segments plus reserved room: what is kept under `max_bytes`."""
        return self._total

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """All entries, least recently read first (a copy: safe to evict while iterating)."""
        return list(self._entries.values())

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def add(self, entry: Entry, records: dict[int, bytes] | None = None) -> None:
        """Put a new entry in as the most recently read, with the segments already on disk (at start-up)."""
        assert entry.name not in self._entries and not entry.dropped and entry.bytes == 0
        self._entries[entry.name] = entry
        for segnum, digest in (records or {}).items():
            entry.records[segnum] = digest
            self._add_bytes(entry, entry.span_size(segnum))

    def touch(self, entry: Entry) -> None:
        """The entry was just read: it is evicted last."""
        if self._entries.get(entry.name) is entry:
            self._entries.move_to_end(entry.name)
        entry.last_access_ns = time.time_ns()

    def hold(self, entry: Entry) -> Hold:
        return Hold(self, entry)

    @contextmanager
    def busy(self, entry: Entry, segnum: int) -> Iterator[None]:
        """The segment's bytes on disk are being read or written: it is not punched meanwhile.

        Only a held entry's segments are busy (a whole file that is not held may go at any time).
        """
        assert entry.users > 0, "busy segments belong to held entries"
        entry.busy[segnum] += 1
        try:
            yield
        finally:
            entry.busy[segnum] -= 1
            if entry.busy[segnum] <= 0:
                del entry.busy[segnum]

    def reserve(self, entry: Entry, size: int) -> Reservation | None:
        """Room for a segment of `size` bytes of a held entry, evicting for it; None if it cannot get room."""
        assert entry.users > 0, "room is reserved for held entries"
        if entry.dropped or size == 0 or not self.make_room(size) or entry.dropped:
            return None
        return Reservation(self, entry, size)

    def invalidate(self, entry: Entry, segnum: int, digest: bytes) -> bool:
        """Forget a present segment that turned out bad; False if it was already forgotten or replaced."""
        if entry.records.get(segnum) is not digest:
            return False
        self._forget_segment(entry, segnum)
        self.discarded_segments += 1
        return True

    def forget_segments(self, entry: Entry) -> None:
        """The entry's files are gone: none of its segments is present any more."""
        self.discarded_segments += len(entry.records)
        for segnum in list(entry.records):
            self._forget_segment(entry, segnum)

    def discard(self, entry: Entry) -> None:
        """Take an entry out of the index for good and remove its files; holders finish what they opened."""
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        if not entry.dropped:
            self._total -= entry.bytes
        entry.dropped = True
        entry.bytes = entry.reserved = 0
        entry.records.clear()
        entry.verified.clear()
        self._remove(entry)

    def make_room(self, need: int) -> bool:
        """Evict until `need` more bytes fit under max_bytes; False if they cannot."""
        if need > self.max_bytes:
            return False
        limit = self.max_bytes - need
        for entry in self.entries():  # whole idle files, least recently read first
            if self._total <= limit:
                return True
            if entry.users == 0 and entry.bytes > 0:
                log.debug("read cache: evicting %s (%d bytes)", entry.short, entry.bytes)
                self.discard(entry)
                self.evicted_files += 1
        if self._punch_supported:
            for entry in self.entries():  # then segments of files in use, away from their readers
                for segnum in self._punch_order(entry):
                    if self._total <= limit:
                        return True
                    if segnum not in entry.records:
                        continue
                    if not self._punch(entry, segnum):
                        self._punch_supported = False  # evict whole files only from now on
                        return self._total <= limit
                    if segnum in entry.records:  # (`punch` may have found the files gone altogether)
                        self._forget_segment(entry, segnum)
                        self.evicted_segments += 1
        return self._total <= limit

    def check(self) -> None:
        """Raise AssertionError unless the accounting adds up (tests call it; cheap enough for debugging)."""
        total = 0
        for name, entry in self._entries.items():
            assert name == entry.name and not entry.dropped, name
            assert entry.users >= 0 and entry.reserved >= 0, name
            assert entry.verified <= entry.records.keys(), name
            present = sum(entry.span_size(segnum) for segnum in entry.records)
            assert entry.bytes == present + entry.reserved, (name, entry.bytes, present, entry.reserved)
            total += entry.bytes
        assert total == self._total, (total, self._total)
        assert self._total <= self.max_bytes, (self._total, self.max_bytes)

    def _punch_order(self, entry: Entry) -> list[int]:
        """Segments behind the reader (oldest first), then those ahead (farthest first); none being used."""
        if not entry.records or entry.segment_size is None:
            return []
        position = (entry.last_end or 0) // entry.segment_size
        idle = [s for s in entry.records if s not in entry.busy]
        behind = sorted(s for s in idle if s < position)
        ahead = sorted((s for s in idle if s >= position), reverse=True)
        return behind + ahead

    def _forget_segment(self, entry: Entry, segnum: int) -> None:
        size = entry.span_size(segnum)
        del entry.records[segnum]
        entry.verified.discard(segnum)
        if not entry.dropped:
            self._add_bytes(entry, -size)

    def _add_bytes(self, entry: Entry, size: int) -> None:
        entry.bytes += size
        self._total += size
