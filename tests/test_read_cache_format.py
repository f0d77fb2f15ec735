"""The read cache's on-disk format on its own: bytes written before the split still parse the same, records round
trip, and truncated, corrupt or foreign records are refused (a refused slot is a miss, fetched again)."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grid_server.read_cache_format import (
    EMPTY_SLOT,
    HEADER_SIZE,
    SLOT_SIZE,
    Identity,
    header_check,
    pack_header,
    pack_slot,
    parse_entry,
    parse_header,
    parse_slot,
    segment_digest,
    slot_offset,
)

IDENTITY = Identity(bytes(range(16)), bytes(range(100, 132)), 3, 10, 150_000)
SEG = 60_000

# Written by the code before the read cache was split (commit 7139721) for IDENTITY, segment size 60,000, with
# segment 0 = b"a" * 60_000 and segment 2 = b"c" * 30_000 present: a cache made then must read the same now.
OLD_NAME = "aaaqeayeaudaocajbifqydiob4-7x74ght3hour22gn"
OLD_HEADER = bytes.fromhex(
    "424d524341434831000102030405060708090a0b0c0d0e0f6465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
    "808182830003000a00000000000249f0000000000000ea601b685577eb45d005f9703ff510188d27000000000000000000000000"
    "000000000000000000000000000000000000000000000000"
)
OLD_CHECK = bytes.fromhex("1b685577eb45d005f9703ff510188d27")
OLD_SLOT0 = bytes.fromhex(
    "956efae2219533b44d328242c6083c0eee503625290fc829cef07ecea6e07c23ff93bcadeda4acc231265d99eb198c71"
)
OLD_SLOT2 = bytes.fromhex(
    "80ac7a8d804e0ac70666c6a29f401535cd08635f31acdd30d065d8b2f25d8cf74dabe47a959cb40d71e0483f5438fdbe"
)
OLD_META = OLD_HEADER + OLD_SLOT0 + EMPTY_SLOT + OLD_SLOT2
HEADER_CHECKED = 76 + 16  # the header's fields, then their check; zero padding up to HEADER_SIZE follows
DIGEST0 = hashlib.sha256(b"a" * SEG).digest()
DIGEST2 = hashlib.sha256(b"c" * 30_000).digest()


def test_bytes_written_before_the_split_read_the_same():
    assert IDENTITY.name == OLD_NAME
    assert pack_header(IDENTITY, SEG) == (OLD_HEADER, OLD_CHECK)
    assert header_check(IDENTITY, SEG) == OLD_CHECK
    assert pack_slot(OLD_CHECK, 0, segment_digest(b"a" * SEG)) == OLD_SLOT0
    assert pack_slot(OLD_CHECK, 2, segment_digest(b"c" * 30_000)) == OLD_SLOT2
    parsed = parse_entry(OLD_NAME, OLD_META, data_size=150_000)
    assert parsed is not None
    assert (parsed.identity, parsed.segment_size, parsed.records) == (IDENTITY, SEG, {0: DIGEST0, 2: DIGEST2})


identities = st.builds(
    Identity,
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=32, max_size=32),
    st.integers(1, 128),
    st.just(256),
    st.integers(1, 2**40),
)


@given(identity=identities, segment_size=st.integers(1, 2**30), segnum=st.integers(0, 2**20), data=st.binary())
def test_round_trip(identity, segment_size, segnum, data):
    header, check = pack_header(identity, segment_size)
    assert len(header) == HEADER_SIZE
    assert parse_header(header) == (identity, segment_size)
    slot = pack_slot(check, segnum, segment_digest(data))
    assert len(slot) == SLOT_SIZE
    assert parse_slot(check, segnum, slot) == segment_digest(data)
    assert slot_offset(segnum) == HEADER_SIZE + segnum * SLOT_SIZE


@given(position=st.integers(0, len(OLD_META) - 1), flip=st.integers(1, 255))
def test_any_damaged_byte_loses_that_record_or_the_whole_entry(position, flip):
    raw = bytearray(OLD_META)
    raw[position] ^= flip
    parsed = parse_entry(OLD_NAME, bytes(raw), data_size=150_000)
    if position < HEADER_CHECKED:  # the header's fields or its check: the entry goes
        assert parsed is None
    elif position < HEADER_SIZE:  # padding after the check is not part of the header
        assert parsed is not None and parsed.records == {0: DIGEST0, 2: DIGEST2}
    elif position < HEADER_SIZE + SLOT_SIZE:
        assert parsed is not None and parsed.records == {2: DIGEST2}
    elif position < HEADER_SIZE + 2 * SLOT_SIZE:  # an empty slot made non-empty is still no record
        assert parsed is not None and parsed.records == {0: DIGEST0, 2: DIGEST2}
    else:
        assert parsed is not None and parsed.records == {0: DIGEST0}


def test_truncated_records_are_refused():
    for cut in range(HEADER_SIZE):
        assert parse_header(OLD_META[:cut]) is None
        assert parse_entry(OLD_NAME, OLD_META[:cut], data_size=150_000) is None
    assert parse_entry(OLD_NAME, OLD_HEADER, data_size=150_000) is None  # no slot: nothing worth keeping
    torn = parse_entry(OLD_NAME, OLD_META[:-1], data_size=150_000)  # the last slot cut short
    assert torn is not None and torn.records == {0: DIGEST0}
    assert parse_slot(OLD_CHECK, 0, OLD_SLOT0[:-1]) is None
    assert parse_slot(OLD_CHECK, 0, EMPTY_SLOT) is None


def test_a_record_is_bound_to_its_entry_and_place():
    assert parse_slot(OLD_CHECK, 1, OLD_SLOT0) is None  # moved to another segment
    other = header_check(Identity(bytes(16), bytes(32), 3, 10, 150_000), SEG)
    assert parse_slot(other, 0, OLD_SLOT0) is None  # copied into another file's meta
    assert parse_entry("aaaa-bbbb", OLD_META, data_size=150_000) is None  # renamed: the header names another
    meta = OLD_HEADER + OLD_SLOT2 + EMPTY_SLOT + OLD_SLOT0  # slots swapped
    assert parse_entry(OLD_NAME, meta, data_size=150_000) is None


@pytest.mark.parametrize(
    ("data_size", "records"),
    [(150_000, {0, 2}), (149_999, {0}), (60_000, {0}), (59_999, None), (0, None)],
)
def test_records_past_the_end_of_the_data_file_are_absent(data_size, records):
    parsed = parse_entry(OLD_NAME, OLD_META, data_size=data_size)
    assert (None if parsed is None else set(parsed.records)) == records


def test_headers_with_impossible_fields_are_refused():
    for identity, segment_size in [
        (Identity(bytes(16), bytes(32), 0, 10, 100), SEG),  # k = 0
        (Identity(bytes(16), bytes(32), 11, 10, 100), SEG),  # k > N
        (Identity(bytes(16), bytes(32), 3, 257, 100), SEG),  # N > 256
        (Identity(bytes(16), bytes(32), 3, 10, 0), SEG),  # empty file (a LIT, never cached)
        (Identity(bytes(16), bytes(32), 3, 10, 100), 0),
    ]:
        assert parse_header(pack_header(identity, segment_size)[0]) is None
    assert parse_header(b"BMRCACH2" + OLD_HEADER[8:]) is None  # another format version
