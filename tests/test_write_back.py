"""The write-back core (grid_server/write_back.py) as a state machine: changes, uploads and publishes in any order,
with progress records that the disk may refuse, crashes, and compactions.

After every step the journal written so far is replayed into a new core: replay must reach the live core's state
(unless a progress record was refused since, which costs redone work, never a change), and no change the kernel was
told had succeeded may be missing: each entry's last change is still pending after the replay, with its content, or
on the grid. Every step appends at most one record, so this covers a crash at every point of the journal.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from grid_server.journal_records import (
    Change,
    Link,
    MalformedRecord,
    Published,
    Record,
    Removal,
    Together,
    Uploaded,
    parse_record,
    serialize_record,
)
from grid_server.write_back import EntryKey, WriteBack

DIRECTORIES = ["URI:DIR2:aaaa:1111", "URI:DIR2:bbbb:2222"]
NAMES = ["x", "y", "z"]
LOCALS = ["local1", "local2", "local3"]  # shared between entries, as hard links share them


def uploaded_cap(local: str, version: int) -> str:
    return f"URI:CHK:{local}:{version}"


def replayed(journal: list[Record]) -> WriteBack:
    core = WriteBack()
    core.replay(journal)
    core.check()
    return core


class WriteBackMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.live = WriteBack()
        self.journal: list[Record] = []
        self.faithful = True  # every progress record since the last crash or compaction reached the journal
        self.acknowledged: dict[EntryKey, Change] = {}  # each entry's last change the kernel was told succeeded
        self.on_grid: set[int] = set()  # the changes some publish put on the grid
        self.versions = dict.fromkeys(LOCALS, 0)  # writes to each local file so far
        self.dirty: set[str] = set()  # local files whose current version is not uploaded
        self.link_versions: dict[int, int] = {}  # a link with local content: the version it was recorded at
        self.publishing: dict[str, list[Change]] = {}  # batches being published, by directory

    def _append(self, record: Record, refused: bool = False) -> None:
        """Journal a record, unless the disk refuses it: a refused progress record costs redone work after a
        crash (replay no longer reaches the live state); a refused change is never made, so it costs nothing."""
        assert parse_record(serialize_record(record)) == record
        if refused:
            self.faithful = self.faithful and isinstance(record, Together)
        else:
            self.journal.append(record)

    @rule(
        directory=st.sampled_from(DIRECTORIES),
        name=st.sampled_from(NAMES),
        local=st.none() | st.sampled_from(LOCALS),
        written=st.booleans(),
        mode=st.integers(0, 0o777),
    )
    def link(self, directory: str, name: str, local: str | None, written: bool, mode: int) -> None:
        """A create, write, rename target or attribute change: a link, recorded with its local file when that
        holds content the grid lacks (just written, or still dirty from earlier)."""
        if local is not None and (written or local not in self.dirty):
            self.versions[local] += 1
            self.dirty.add(local)
        cap = "URI:LIT:" if local is None else None
        change = self.live.new_link(directory, name, "file", {"mode": mode}, cap, local)
        self._append(change)
        self.live.apply(change)
        self.acknowledged[(directory, name)] = change
        if local is not None:
            self.link_versions[change.seq] = self.versions[local]

    @rule(
        first=st.tuples(st.sampled_from(DIRECTORIES), st.sampled_from(NAMES)),
        second=st.tuples(st.sampled_from(DIRECTORIES), st.sampled_from(NAMES)),
        locals_=st.tuples(st.none() | st.sampled_from(LOCALS), st.none() | st.sampled_from(LOCALS)),
        refused=st.booleans(),
    )
    def exchange(
        self, first: EntryKey, second: EntryKey, locals_: tuple[str | None, str | None], refused: bool
    ) -> None:
        """A RENAME_EXCHANGE: two links in one record, which the disk takes whole or refuses whole (then the
        kernel is told it failed, and neither name changes)."""
        if first == second:
            return
        changes = tuple(
            self.live.new_link(directory, name, "file", {}, "URI:LIT:" if local is None else None, local)
            for (directory, name), local in zip((first, second), locals_, strict=True)
        )
        self._append(Together(changes), refused)
        if refused:
            return
        for local in {local for local in locals_ if local is not None} - self.dirty:
            self.versions[local] += 1  # a clean local file linked with content: it was written
            self.dirty.add(local)
        for change in changes:
            self.live.apply(change)
            self.acknowledged[(change.directory, change.name)] = change
            if change.local is not None:
                self.link_versions[change.seq] = self.versions[change.local]

    @rule(directory=st.sampled_from(DIRECTORIES), name=st.sampled_from(NAMES))
    def remove(self, directory: str, name: str) -> None:
        change = self.live.new_removal(directory, name)
        self._append(change)
        self.live.apply(change)
        self.acknowledged[(directory, name)] = change

    @precondition(lambda self: self.dirty)
    @rule(data=st.data(), refused=st.booleans())
    def upload(self, data: st.DataObject, refused: bool) -> None:
        local = data.draw(st.sampled_from(sorted(self.dirty)))
        self.dirty.discard(local)
        self._append(self.live.mark_uploaded(local, uploaded_cap(local, self.versions[local])), refused)

    @rule(directory=st.sampled_from(DIRECTORIES))
    def begin_publish(self, directory: str) -> None:
        """Take the ready changes; other changes may come while the directory update runs."""
        if directory not in self.publishing:
            self.publishing[directory] = list(self.live.ready(directory).values())

    @precondition(lambda self: self.publishing)
    @rule(data=st.data(), refused=st.booleans())
    def end_publish(self, data: st.DataObject, refused: bool) -> None:
        directory = data.draw(st.sampled_from(sorted(self.publishing)))
        batch = self.publishing.pop(directory)
        self.on_grid.update(change.seq for change in batch)
        published = self.live.mark_published(batch)
        assert set(published.seqs) <= {change.seq for change in batch}
        self._append(published, refused)

    @rule()
    def crash(self) -> None:
        """The process dies; the next one replays the journal, and uploads whatever its links wait for."""
        self.live = replayed(self.journal)
        self.publishing.clear()
        self.faithful = True
        self.dirty = self.live.waiting_locals()

    @precondition(lambda self: self.live.count() == 0)
    @rule()
    def compact(self) -> None:
        self.journal = []
        self.faithful = True

    @invariant()
    def consistent(self) -> None:
        self.live.check()
        assert self.live.count() == len(self.live.snapshot().changes)

    @invariant()
    def replay_reaches_the_live_state(self) -> None:
        if self.faithful:
            assert replayed(self.journal).snapshot() == self.live.snapshot()

    @invariant()
    def no_acknowledged_change_is_lost(self) -> None:
        core = replayed(self.journal)
        for (directory, name), change in self.acknowledged.items():
            pending = core.change(directory, name)
            if pending is None:
                assert change.seq in self.on_grid, f"{change} is neither pending nor on the grid"
                continue
            assert pending.seq == change.seq, f"{pending} would be published over the later {change}"
            if isinstance(change, Link) and change.local is not None:
                assert isinstance(pending, Link)
                if pending.local is None:  # resolved by an upload: of the content written by then, or later
                    assert pending.cap is not None
                    local, version = pending.cap.split(":")[2:]
                    assert local == change.local and int(version) >= self.link_versions[change.seq], pending
                else:
                    assert pending.local == change.local


TestWriteBack = WriteBackMachine.TestCase
TestWriteBack.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def test_records_as_earlier_versions_wrote_them_parse() -> None:
    """The journal lines of the versions before typed records, byte for byte as they wrote them."""
    lines = [
        {"op": "set", "seq": 1, "dir": DIRECTORIES[0], "name": "a", "kind": "file", "meta": {"m": 1}, "cap": None,
         "local": "f00d"},
        {"op": "set", "seq": 2, "dir": DIRECTORIES[0], "name": "b"},
        {"op": "uploaded", "local": "f00d", "cap": "URI:CHK:x"},
        {"op": "published", "seqs": [1, 2]},
    ]  # fmt: skip
    records = [parse_record(line) for line in lines]
    assert records == [
        Link(1, DIRECTORIES[0], "a", "file", {"m": 1}, None, "f00d"),
        Removal(2, DIRECTORIES[0], "b"),
        Uploaded("f00d", "URI:CHK:x"),
        Published((1, 2)),
    ]
    assert [serialize_record(record) for record in records] == lines
    core = replayed(records)
    assert core.count() == 0


def test_an_upload_before_a_later_write_does_not_resolve_it() -> None:
    """A file uploaded, then written again before the crash: the replayed link waits for the new content (an
    order-blind replay would give it the first upload's cap and lose the second write)."""
    directory = DIRECTORIES[0]
    journal: list[Record] = [
        Link(1, directory, "a", "file", {}, None, "f00d"),
        Uploaded("f00d", "URI:CHK:first"),
        Link(2, directory, "a", "file", {}, "URI:CHK:first", "f00d"),
    ]
    assert replayed(journal).change(directory, "a") == journal[2]


def test_malformed_records_are_refused() -> None:
    for raw in (
        [],
        {"op": "set", "seq": "1", "dir": "d", "name": "n"},
        {"op": "set", "seq": 1, "dir": "d", "name": "n", "kind": "file", "meta": {}, "cap": None, "local": None},
        {"op": "published", "seqs": ["1"]},
        {"op": "together", "changes": []},
        {"op": "together", "changes": [{"op": "published", "seqs": [1]}]},
        {"op": "unknown"},
    ):
        try:
            parse_record(raw)
        except MalformedRecord:
            continue
        raise AssertionError(f"{raw} was taken")
