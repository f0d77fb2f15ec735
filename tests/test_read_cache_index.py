"""The read cache's index and eviction against a model of the disk: random adds, stores (some left half-done
while other steps run), reads, holds, busy segments, invalidations, drops and evictions. After every step the
accounting adds up and stays under the limit, the index holds exactly what the fake disk holds, and nothing held
or busy is evicted."""

import hashlib
from contextlib import ExitStack
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from grid_server.read_cache_files import EntryFiles
from grid_server.read_cache_format import Identity
from grid_server.read_cache_index import CacheIndex, Entry, Hold, Reservation

SEGMENT = 100
FILES = 5


def identity(i: int) -> Identity:
    return Identity(bytes([i]) * 16, bytes([i]) * 32, 3, 10, SEGMENT * (i + 1) + 37 * i)  # last segment short


class IndexMachine(RuleBasedStateMachine):
    @initialize(max_bytes=st.integers(0, 5 * SEGMENT), punch_works=st.booleans())
    def start(self, max_bytes, punch_works):
        self.punch_works = punch_works
        self.index = CacheIndex(max_bytes, remove=self.remove, punch=self.punch, on_idle=self.on_idle)
        self.disk: set[tuple[str, int]] = set()  # the model: segments the fake disk holds
        self.entries: dict[int, Entry] = {}
        self.holds: list[Hold] = []
        self.discarded: list[Entry] = []  # entries the steps dropped themselves (the others went by eviction)
        self.busy: list[tuple[Entry, int, ExitStack]] = []
        self.writes: list[tuple[Entry, int, Reservation, ExitStack]] = []

    # --- the fake disk ---------------------------------------------------------------------------------------
    def remove(self, entry):
        assert entry.users == 0 or entry.dropped
        self.disk = {(name, s) for name, s in self.disk if name != entry.name}

    def punch(self, entry, segnum):
        assert segnum not in entry.busy, "a busy segment was punched"
        if self.punch_works:
            self.disk.discard((entry.name, segnum))
        return self.punch_works

    def on_idle(self, entry):
        assert entry.users == 0

    def entry(self, i):
        entry = self.entries.get(i)
        if entry is None or entry.dropped:
            entry = self.entries[i] = Entry(identity(i), EntryFiles(Path("/nonexistent"), identity(i).name), SEGMENT)
            self.index.add(entry)
        return entry

    # --- steps -----------------------------------------------------------------------------------------------
    @rule(i=st.integers(0, FILES - 1), segnum=st.integers(0, FILES), ok=st.booleans())
    def store(self, i, segnum, ok):
        """A whole store: reserve room, write, commit (or fail and give the room back)."""
        entry = self.entry(i)
        segnum %= entry.num_segments
        if segnum in entry.records:
            return
        with self.index.hold(entry):
            reservation = self.index.reserve(entry, entry.span_size(segnum))
            if reservation is None:
                return
            with reservation:
                self.index.check()
                if ok and reservation.commit(segnum, hashlib.sha256(b"%d" % segnum).digest()):
                    self.disk.add((entry.name, segnum))

    @rule(i=st.integers(0, FILES - 1), segnum=st.integers(0, FILES))
    def begin_write(self, i, segnum):
        """A store whose write is still under way (holding its entry, as the fetcher does) while other steps run."""
        entry = self.entry(i)
        segnum %= entry.num_segments
        stack = ExitStack()
        stack.enter_context(self.index.hold(entry))
        reservation = self.index.reserve(entry, entry.span_size(segnum))
        if reservation is None:
            stack.close()
            return
        stack.enter_context(reservation)
        stack.enter_context(self.index.busy(entry, segnum))
        self.writes.append((entry, segnum, reservation, stack))

    @precondition(lambda self: self.writes)
    @rule(pick=st.integers(0, 100), ok=st.booleans())
    def end_write(self, pick, ok):
        entry, segnum, reservation, stack = self.writes.pop(pick % len(self.writes))
        if ok and reservation.commit(segnum, b"d" * 32):
            assert not entry.dropped
            self.disk.add((entry.name, segnum))
        stack.close()

    @rule(i=st.integers(0, FILES - 1))
    def touch(self, i):
        self.index.touch(self.entry(i))

    @rule(i=st.integers(0, FILES - 1))
    def hold(self, i):
        self.holds.append(self.index.hold(self.entry(i)))

    @precondition(lambda self: self.holds)
    @rule(pick=st.integers(0, 100))
    def release(self, pick):
        hold = self.holds.pop(pick % len(self.holds))
        with hold:
            pass
        with hold:  # a second release is a no-op
            pass
        assert hold.entry.users >= 0

    @rule(i=st.integers(0, FILES - 1), segnum=st.integers(0, FILES))
    def mark_busy(self, i, segnum):
        """A read of a cached segment under way (holding its entry, as reads do)."""
        entry = self.entry(i)
        if segnum in entry.records:
            stack = ExitStack()
            stack.enter_context(self.index.hold(entry))
            stack.enter_context(self.index.busy(entry, segnum))
            self.busy.append((entry, segnum, stack))

    @precondition(lambda self: self.busy)
    @rule(pick=st.integers(0, 100))
    def unmark_busy(self, pick):
        _entry, _segnum, stack = self.busy.pop(pick % len(self.busy))
        stack.close()

    @rule(i=st.integers(0, FILES - 1), segnum=st.integers(0, FILES))
    def invalidate(self, i, segnum):
        entry = self.entry(i)
        digest = entry.records.get(segnum)
        if digest is not None and self.index.invalidate(entry, segnum, digest):
            self.disk.discard((entry.name, segnum))
            assert not self.index.invalidate(entry, segnum, digest)

    @rule(i=st.integers(0, FILES - 1))
    def discard(self, i):
        entry = self.entries.get(i)
        if entry is not None:
            self.index.discard(entry)
            self.discarded.append(entry)
            assert entry.dropped and entry.bytes == 0 and not entry.records

    @rule(need=st.integers(0, 4 * SEGMENT))
    def make_room(self, need):
        held = [e for e in self.index.entries() if e.users > 0]
        busy = [(e, s) for e, s, _ in self.busy if self.index.get(e.name) is e]
        fits = self.index.make_room(need)
        self.index.check()
        assert all(self.index.get(e.name) is e for e in held), "a held entry was evicted"
        assert all(s in e.records for e, s in busy), "a busy segment was evicted"
        if fits:
            assert self.index.total + need <= self.index.max_bytes
        elif need <= self.index.max_bytes:  # refused only with nothing left it may evict
            for entry in self.index.entries():
                assert entry.users > 0 or entry.bytes == 0
                if self.punch_works:
                    assert all(s in entry.busy for s in entry.records)

    # --- after every step --------------------------------------------------------------------------------
    @invariant()
    def accounting_adds_up(self):
        if not hasattr(self, "index"):
            return
        self.index.check()
        present = {(e.name, s) for e in self.index.entries() for s in e.records}
        assert present == self.disk
        assert self.index.total == sum(e.bytes for e in self.index.entries())
        for entry in self.entries.values():
            if entry.dropped and entry.users > 0:
                assert any(entry is e for e in self.discarded), "a held entry was evicted"
            others = sum(1 for e, *_ in self.busy + self.writes if e is entry)
            assert entry.users == others + sum(1 for h in self.holds if h.entry is entry)


IndexMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_index_against_a_model = IndexMachine.TestCase
