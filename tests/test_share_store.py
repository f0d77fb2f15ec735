"""The on-disk share store: Tahoe's container layout, read-test-write rules, leases, and crash safety."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lafs_core.mutable.slot import TestAndWrite, TestVector, WriteVector, apply_writes, new_share_test
from lafs_core.storage import journal as journal_module
from lafs_core.storage.containers import (
    IMMUTABLE_DATA_OFFSET,
    MUTABLE_DATA_OFFSET,
    hash_lease_secret,
    parse_immutable_container,
    parse_mutable_header,
)
from lafs_core.storage.journal import FileChange, Journal
from lafs_core.storage.share_store import (
    AlreadyCompleteError,
    BadWriteEnablerError,
    ConflictingWriteError,
    NoSuchShareError,
    OutOfBoundsError,
    ShareStore,
    UnknownUploadError,
    WrongSecretError,
)

SI = bytes(range(16))
RENEW, CANCEL, UPLOAD = b"r" * 32, b"c" * 32, b"u" * 32
WE = b"w" * 32


def share_file(store, shnum, si=SI):
    return store._share_path(si, shnum)


def test_immutable_upload_lifecycle(tmp_path):
    store = ShareStore(tmp_path)
    result = store.allocate(SI, RENEW, CANCEL, UPLOAD, {0, 1}, 48)
    assert result.allocated == {0, 1} and not result.already_have
    assert store.immutable_shares(SI) == set()  # nothing final until complete
    assert store.write(SI, 0, UPLOAD, 0, b"a" * 20) == [(20, 48)]
    assert store.write(SI, 0, UPLOAD, 30, b"b" * 18) == [(20, 30)]
    store.write(SI, 0, UPLOAD, 10, b"a" * 10)  # overlapping with the same bytes is fine
    with pytest.raises(ConflictingWriteError):
        store.write(SI, 0, UPLOAD, 15, b"x" * 10)
    with pytest.raises(OutOfBoundsError):
        store.write(SI, 0, UPLOAD, 40, b"z" * 9)
    with pytest.raises(WrongSecretError):
        store.write(SI, 0, b"wrong" * 7, 20, b"c" * 10)
    assert store.write(SI, 0, UPLOAD, 20, b"c" * 10) == []
    assert store.immutable_shares(SI) == {0}
    assert store.read_immutable(SI, 0, 0, 100) == b"a" * 20 + b"c" * 10 + b"b" * 18
    assert store.read_immutable(SI, 0, 45, 10) == b"bbb" and store.read_immutable(SI, 0, 48, 5) == b""
    raw = share_file(store, 0).read_bytes()
    # Spec example: a 48-byte share with one lease is a 132-byte file beginning 00000002 00000030 00000001.
    assert len(raw) == 132 and raw[:12] == bytes.fromhex("00000002 00000030 00000001")
    assert raw[IMMUTABLE_DATA_OFFSET + 48 + 4 : IMMUTABLE_DATA_OFFSET + 48 + 36] == hash_lease_secret(RENEW)
    with pytest.raises(AlreadyCompleteError):
        store.abort(SI, 0, UPLOAD)
    store.abort(SI, 1, UPLOAD)
    with pytest.raises(UnknownUploadError):
        store.write(SI, 1, UPLOAD, 0, b"x")
    assert not (tmp_path / "shares" / "incoming").exists() or not any((tmp_path / "shares" / "incoming").rglob("*1"))
    again = store.allocate(SI, RENEW, CANCEL, UPLOAD, {0, 1, 2}, 48)
    assert again.already_have == {0} and again.allocated == {1, 2}
    with pytest.raises(NoSuchShareError):
        store.read_immutable(SI, 7, 0, 1)


def test_allocation_respects_space(tmp_path):
    store = ShareStore(tmp_path, reserved_space=0)
    huge = store.available_space() + 1
    assert store.allocate(SI, RENEW, CANCEL, UPLOAD, {0}, huge).allocated == frozenset()


def test_incoming_is_wiped_on_restart(tmp_path):
    store = ShareStore(tmp_path)
    store.allocate(SI, RENEW, CANCEL, UPLOAD, {3}, 10)
    store.write(SI, 3, UPLOAD, 0, b"half")
    ShareStore(tmp_path)
    assert not (tmp_path / "shares" / "incoming").exists()
    assert ShareStore(tmp_path).immutable_shares(SI) == set()


def test_leases_renew_or_add(tmp_path):
    store = ShareStore(tmp_path)
    store.allocate(SI, RENEW, CANCEL, UPLOAD, {0}, 4)
    store.write(SI, 0, UPLOAD, 0, b"data")
    assert store.add_or_renew_lease(SI, RENEW, CANCEL)  # same secret: renewed, not added
    raw = share_file(store, 0).read_bytes()
    assert struct.unpack(">L", raw[8:12])[0] == 1
    store.add_or_renew_lease(SI, b"R" * 32, b"C" * 32)
    raw = share_file(store, 0).read_bytes()
    info = parse_immutable_container(raw, len(raw))
    assert struct.unpack(">L", raw[8:12])[0] == 2 and info.data_length == 4
    assert store.read_immutable(SI, 0, 0, 10) == b"data"
    assert not store.add_or_renew_lease(b"x" * 16, RENEW, CANCEL)


def rtw(store, vectors, read=((0, 10),), we=WE):
    return store.read_test_write(SI, we, RENEW, CANCEL, vectors, list(read))


def test_mutable_create_update_and_test_failure(tmp_path):
    store = ShareStore(tmp_path, nodeid=b"n" * 20)
    created = rtw(store, {0: TestAndWrite((new_share_test(),), (WriteVector(0, b"0123456789"),))})
    assert created.success and created.data == {}
    raw = share_file(store, 0).read_bytes()
    header = parse_mutable_header(raw)
    # Spec example: a 10-byte share is a 482-byte file with its extra-lease offset at 478.
    assert len(raw) == 482 and header.extra_lease_offset == 478 and header.write_enabler_nodeid == b"n" * 20
    again = rtw(store, {0: TestAndWrite((new_share_test(),), (WriteVector(0, b"zzz"),))})
    assert not again.success and again.data == {0: [b"0123456789"]}
    assert store.read_mutable(SI, 0, 0, 100) == b"0123456789"
    ok = rtw(store, {0: TestAndWrite((TestVector(0, 4, b"0123"),), (WriteVector(12, b"AB"),))})
    assert ok.success and store.read_mutable(SI, 0, 0, 100) == b"0123456789\0\0AB"
    with pytest.raises(BadWriteEnablerError):
        rtw(store, {0: TestAndWrite((), (WriteVector(0, b"x"),))}, we=b"x" * 32)
    # new_length: smaller truncates, larger is ignored, zero deletes.
    rtw(store, {0: TestAndWrite((), (), 5)})
    assert store.read_mutable(SI, 0, 0, 100) == b"01234"
    rtw(store, {0: TestAndWrite((), (), 50)})
    assert store.mutable_data_length(SI, 0) == 5
    rtw(store, {0: TestAndWrite((), (), 0)})
    assert store.mutable_shares(SI) == set()


def test_tests_on_every_share_gate_all_writes(tmp_path):
    store = ShareStore(tmp_path)
    rtw(
        store,
        {
            0: TestAndWrite((new_share_test(),), (WriteVector(0, b"aaaa"),)),
            1: TestAndWrite((new_share_test(),), (WriteVector(0, b"bbbb"),)),
        },
    )
    result = rtw(
        store,
        {
            0: TestAndWrite((TestVector(0, 4, b"aaaa"),), (WriteVector(0, b"AAAA"),)),
            1: TestAndWrite((TestVector(0, 4, b"nope"),), (WriteVector(0, b"BBBB"),)),
        },
    )
    assert not result.success
    assert store.read_mutable(SI, 0, 0, 4) == b"aaaa" and store.read_mutable(SI, 1, 0, 4) == b"bbbb"


def test_growing_data_moves_the_extra_leases(tmp_path):
    store = ShareStore(tmp_path)
    rtw(store, {0: TestAndWrite((), (WriteVector(0, b"x" * 10),))})
    for i in range(6):  # four slots, then two extra leases
        store.add_or_renew_lease(SI, bytes([i]) * 32, bytes([i]) * 32)
    path = share_file(store, 0)
    header = parse_mutable_header(path.read_bytes())
    count_at = header.extra_lease_offset
    assert struct.unpack(">L", path.read_bytes()[count_at : count_at + 4])[0] >= 2
    rtw(store, {0: TestAndWrite((), (WriteVector(5, b"y" * 1000),))})
    raw = path.read_bytes()
    header = parse_mutable_header(raw)
    assert header.extra_lease_offset == MUTABLE_DATA_OFFSET + 1005
    assert struct.unpack(">L", raw[header.extra_lease_offset : header.extra_lease_offset + 4])[0] >= 2
    assert store.read_mutable(SI, 0, 0, 2000) == b"x" * 5 + b"y" * 1000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(0, 3000), st.binary(min_size=0, max_size=300), st.none() | st.integers(0, 3500)),
        min_size=1,
        max_size=12,
    )
)
def test_random_mutable_writes_match_a_model(tmp_path_factory, operations):
    store = ShareStore(tmp_path_factory.mktemp("store"))
    model = b""
    for offset, data, new_length in operations:
        writes = (WriteVector(offset, data),) if data else ()
        if new_length == 0 or (not writes and not model and new_length is None):
            continue
        rtw(store, {0: TestAndWrite((), writes, new_length)})
        model = apply_writes(model, writes, new_length)
        if model or writes:
            assert store.read_mutable(SI, 0, 0, 10_000) == model


def test_journal_replays_complete_changes_and_drops_torn_ones(tmp_path):
    journal = Journal(tmp_path)
    target = tmp_path / "file"
    target.write_bytes(b"old old old")
    # A kill after the journal was made durable but before it was applied: start-up finishes the change.
    blob = journal_module._encode([FileChange(target, [(0, b"NEW")])], tmp_path)
    (journal.directory / "123-1").write_bytes(blob)
    (journal.directory / "123-2").write_bytes(blob[:-5])  # torn: never started, dropped
    assert Journal(tmp_path).recover() == 1
    assert target.read_bytes() == b"NEW old old"
    assert os.listdir(journal.directory) == []


def test_corruption_advisories_are_recorded(tmp_path):
    store = ShareStore(tmp_path)
    store.allocate(SI, RENEW, CANCEL, UPLOAD, {0}, 3)
    store.write(SI, 0, UPLOAD, 0, b"abc")
    store.advise_corrupt(SI, 0, "block 3 fails its hash check", mutable=False)
    advisories = list((tmp_path / "corruption-advisories").iterdir())
    assert len(advisories) == 1 and "block 3 fails" in advisories[0].read_text()
    with pytest.raises(NoSuchShareError):
        store.advise_corrupt(SI, 5, "x", mutable=False)


def test_immutable_and_mutable_shares_never_replace_each_other(tmp_path):
    store = ShareStore(tmp_path)
    si = bytes(range(16))
    allocation = store.allocate(si, RENEW, CANCEL, UPLOAD, {0}, 10)
    assert allocation.allocated == {0}
    store.write(si, 0, UPLOAD, 0, b"0123456789")
    with pytest.raises(BadWriteEnablerError):
        store.read_test_write(si, WE, RENEW, CANCEL, {1: TestAndWrite((), (WriteVector(0, b"x"),), None)}, [])
    assert store.read_immutable(si, 0, 0, 10) == b"0123456789"

    other = bytes(range(1, 17))
    store.read_test_write(other, WE, RENEW, CANCEL, {0: TestAndWrite((), (WriteVector(0, b"mutable"),), None)}, [])
    allocation = store.allocate(other, RENEW, CANCEL, UPLOAD, {0, 1}, 10)
    assert allocation.allocated == {1} and allocation.already_have == set()
    assert store.read_mutable(other, 0, 0, 7) == b"mutable"


def test_check_write_refuses_before_data(tmp_path):
    store = ShareStore(tmp_path)
    si = bytes(16)
    store.allocate(si, RENEW, CANCEL, UPLOAD, {0}, 10)
    store.check_write(si, 0, UPLOAD, 0, 10)
    with pytest.raises(OutOfBoundsError):
        store.check_write(si, 0, UPLOAD, 5, 11)
    with pytest.raises(WrongSecretError):
        store.check_write(si, 0, bytes(32), 0, 10)
    with pytest.raises(UnknownUploadError):
        store.check_write(si, 1, UPLOAD, 0, 10)
