"""Which names of a hard-linked file missed a change (grid_server/stale_links.py), and the journal records of the
link sweep: the rules a name found by the walk or a lookup is judged by, and their replay after a restart."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from grid_server.journal_records import (
    Link,
    LinkSweep,
    LinkSwept,
    MalformedRecord,
    Together,
    parse_record,
    serialize_record,
)
from grid_server.metadata import PosixFields, with_posix_fields
from grid_server.stale_links import StaleLinks
from lafs_core.caps import LiteralCap

IDENTITY = "ab" * 16
OLD, NEW, FOREIGN = LiteralCap(b"old"), LiteralCap(b"new"), LiteralCap(b"a Tahoe client's")


def entry_metadata(ctime_ns: int, count: int = 2, identity: str | None = IDENTITY) -> dict:
    fields = PosixFields(0o644, 0, 0, 1, 1, ctime_ns, link_id=identity, link_count=count if identity else 1)
    return with_posix_fields({}, fields)


def test_a_name_is_stale_by_a_replaced_cap_or_an_older_ctime_of_the_current_one() -> None:
    stale = StaleLinks()
    stale.apply(stale.new_sweep(IDENTITY, [OLD.to_string()], NEW.to_string(), entry_metadata(100)))
    assert stale.stale(OLD, entry_metadata(5)) is not None  # the cap from before the first write
    assert stale.stale(OLD, entry_metadata(500)) is not None  # whatever its ctime
    assert stale.stale(NEW, entry_metadata(99)) is not None  # the current cap, changed before
    assert stale.stale(NEW, entry_metadata(100)) is None  # brought up to date (or known when changed)
    assert stale.stale(NEW, entry_metadata(101)) is None  # changed since by another mount
    assert stale.stale(FOREIGN, entry_metadata(5)) is None  # rewritten by another client: left alone
    assert stale.stale(OLD, entry_metadata(5, identity="cd" * 16)) is None  # another file
    assert stale.stale(OLD, {}) is None  # not a linked entry


def test_a_later_change_merges_into_the_pending_sweep() -> None:
    """A first write, then a removal of a name while the first's sweep is pending: a name still holding the cap
    from before the first write is stale, and gets the count the removal left."""
    stale = StaleLinks()
    first = stale.new_sweep(IDENTITY, [OLD.to_string()], NEW.to_string(), entry_metadata(100, count=3))
    stale.apply(first)
    second = stale.new_sweep(IDENTITY, [], NEW.to_string(), entry_metadata(200, count=2))
    stale.apply(second)
    assert not stale.current(first) and stale.current(second)
    assert second.replaced == (OLD.to_string(),) and stale.names_wanted(second) == 2
    missed = stale.stale(OLD, entry_metadata(5, count=3))
    assert missed is second
    assert stale.stale(NEW, entry_metadata(150, count=3)) is second


def test_a_count_down_to_one_name_wants_one_name_found() -> None:
    """The last other name removed: the sweep's state has no link identity left, and is filed under the old one."""
    stale = StaleLinks()
    sweep = stale.new_sweep(IDENTITY, [], OLD.to_string(), entry_metadata(100, identity=None))
    stale.apply(sweep)
    assert stale.names_wanted(sweep) == 1 and stale.stale(OLD, entry_metadata(5)) is sweep


def test_replay_reaches_the_same_pending_sweeps() -> None:
    live = StaleLinks()
    records = []
    for identity, ctime in ((IDENTITY, 100), ("cd" * 16, 100), (IDENTITY, 300)):
        record = live.new_sweep(identity, [OLD.to_string()], NEW.to_string(), entry_metadata(ctime, identity=identity))
        live.apply(record)
        records.append(record)
    with_change = live.new_sweep("ef" * 16, [], NEW.to_string(), entry_metadata(100, identity="ef" * 16))
    live.apply(with_change)
    records.append(Together((Link(1, "URI:DIR2:a:b", "f", "file", {}, NEW.to_string(), None),), with_change))
    done = LinkSwept("cd" * 16)
    live.apply(done)
    records.append(done)
    replayed = StaleLinks()
    replayed.replay(parse_record(serialize_record(record)) for record in records)
    assert replayed.pending() == live.pending() and sorted(replayed.pending()) == [IDENTITY, "ef" * 16]
    compacted = StaleLinks()
    compacted.replay(live.records())
    assert compacted.pending() == live.pending()


names = st.text(alphabet="0123456789abcdef", min_size=1, max_size=32)


@given(identity=names, replaced=st.lists(names, max_size=3), cap=names, count=st.integers(1, 10**6))
def test_sweep_records_round_trip(identity: str, replaced: list[str], cap: str, count: int) -> None:
    sweep = LinkSweep(identity, tuple(replaced), cap, {"blackmatch": {"link": {"count": count}}})
    change = Link(count, "URI:DIR2:a:b", identity, "file", {}, cap, None)
    for record in (sweep, LinkSwept(identity), Together((change,), sweep), Together((change, change))):
        assert parse_record(serialize_record(record)) == record


def test_malformed_sweep_records_are_refused() -> None:
    for raw in (
        {"op": "sweep", "id": IDENTITY, "replaced": [1], "cap": "URI:LIT:", "meta": {}},
        {"op": "sweep", "id": IDENTITY, "replaced": [], "cap": None, "meta": {}},
        {"op": "sweep", "replaced": [], "cap": "URI:LIT:", "meta": {}},
        {"op": "swept"},
        {
            "op": "together",
            "changes": [{"op": "set", "seq": 1, "dir": "d", "name": "n"}],
            "sweep": {"op": "swept", "id": IDENTITY},
        },
    ):
        try:
            parse_record(raw)
        except MalformedRecord:
            continue
        raise AssertionError(f"{raw} was taken")
