"""Our own encoder and decoder: loss of shares, corruption anywhere, random sizes and parameters."""

import dataclasses
import itertools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lafs_core.caps import ChkCap, LiteralCap
from lafs_core.errors import FormatError, LafsError, NotEnoughSharesError
from lafs_core.fetch import drive
from lafs_core.immutable.decode import CapMismatchError, ChkReader, read_shares
from lafs_core.immutable.encode import ChkEncoder, ReencodingMismatchError, encode_bytes
from lafs_core.immutable.layout import parse_header, parse_uri_extension
from lafs_core.immutable.params import ChkParameters

SEG = 4096  # small segments keep multi-segment files small


@pytest.fixture(scope="module")
def sample():
    data = os.urandom(5 * SEG + 777)
    cap, shares = encode_bytes(data, convergence=b"secret", max_segment_size=SEG)
    return data, cap, dict(enumerate(shares))


def test_small_files_are_literal():
    for size in (0, 1, 55):
        cap, shares = encode_bytes(b"x" * size, convergence=b"")
        assert isinstance(cap, LiteralCap) and shares == []
    cap, shares = encode_bytes(b"x" * 56, convergence=b"")
    assert isinstance(cap, ChkCap) and len(shares) == 10


def test_survives_loss_of_any_seven_shares(sample):
    data, cap, shares = sample
    for kept in itertools.combinations(range(10), 3):
        assert read_shares(cap, {s: shares[s] for s in kept}) == data


def test_two_shares_are_not_enough(sample):
    _data, cap, shares = sample
    with pytest.raises(NotEnoughSharesError):
        read_shares(cap, {0: shares[0], 9: shares[9]})


def test_every_single_bit_region_flip_is_caught_or_harmless(sample):
    """Flip bits at many positions across one share; reading with that share among the first k gives the
    right plaintext (the bad share replaced) and reports the share when the flip mattered."""
    data, cap, shares = sample
    share = shares[0]
    rng = random.Random(7)
    positions = sorted({*range(0, 80), *rng.sample(range(len(share)), 400), len(share) - 1})
    flagged = 0
    for pos in positions:
        corrupt = bytearray(share)
        corrupt[pos] ^= 1 << rng.randrange(8)
        reader = ChkReader(cap, range(10))
        readers = {s: _reader(bytes(corrupt) if s == 0 else shares[s]) for s in range(10)}
        assert drive(reader.read(0, cap.size), readers) == data
        flagged += 0 in reader.bad_shares
    assert flagged > len(positions) // 2


def test_corruption_in_every_share_beyond_k_gives_an_error_not_bad_bytes(sample):
    data, cap, shares = sample
    params = ChkParameters.for_size(len(data), max_segment_size=SEG)
    good = {0: shares[0], 1: shares[1]}
    for s in range(2, 10):
        raw = bytearray(shares[s])
        raw[0x24 + params.block_size * 2 + 5] ^= 0x10  # inside segment 2's block
        good[s] = bytes(raw)
    with pytest.raises(NotEnoughSharesError) as info:
        read_shares(cap, good)
    assert "fails its hash check" in str(info.value)
    # Segments that are intact still read.
    assert read_shares(cap, good, 0, 2 * SEG) == data[: 2 * SEG]


def test_truncated_shares_are_dropped(sample):
    data, cap, shares = sample
    cut = {s: shares[s][: len(shares[s]) // (s + 2)] for s in range(7)}
    assert read_shares(cap, {**cut, 7: shares[7], 8: shares[8], 9: shares[9]}) == data
    reader = ChkReader(cap, range(10))
    drive(
        reader.read(0, cap.size),
        {**{s: _reader(cut[s]) for s in cut}, 7: _reader(shares[7]), 8: _reader(shares[8]), 9: _reader(shares[9])},
    )
    assert set(reader.bad_shares) | set(reader.unavailable)


def test_reading_a_segment_again_blames_no_share():
    """A block is dropped from memory once used, so a second read of its segment fetches the same spans again:
    that is not a truncated share (only a span that already came back short is)."""
    seg = 64 * 1024
    data = os.urandom(16 * seg + 1)  # shares too big to be read whole on opening
    cap, share_list = encode_bytes(data, convergence=b"", max_segment_size=seg)
    segment_size = ChkParameters.for_size(len(data), max_segment_size=seg).segment_size
    reader = ChkReader(cap, range(10))
    readers = {s: _reader(share) for s, share in enumerate(share_list)}
    for _ in range(4):
        assert drive(reader.segment(2), readers) == data[2 * segment_size : 3 * segment_size]
    assert not reader.bad_shares and not reader.unavailable


def test_unreadable_shares_count_as_unavailable(sample):
    data, cap, shares = sample

    def broken(offset, length):
        raise OSError("disk on fire")

    reader = ChkReader(cap, range(10))
    readers = {s: (broken if s < 4 else _reader(shares[s])) for s in range(10)}
    assert drive(reader.read(0, cap.size), readers) == data
    assert set(reader.unavailable) == {0, 1, 2, 3} and not reader.bad_shares


def test_random_access_fetches_only_needed_segments():
    seg = 64 * 1024
    data = os.urandom(16 * seg + 1)  # shares too big to be read whole on opening
    cap, share_list = encode_bytes(data, convergence=b"", max_segment_size=seg)
    params = ChkParameters.for_size(len(data), max_segment_size=seg)
    fetched = []

    def recording(shnum):
        def read(offset, length):
            fetched.append((offset, length))
            return share_list[shnum][offset : offset + length]

        return read

    reader = ChkReader(cap, range(10))
    start = 3 * seg + 10
    assert drive(reader.read(start, start + 10), {s: recording(s) for s in range(10)}) == data[start : start + 10]
    data_start = 0x24
    blocks_read = {
        (offset - data_start) // params.block_size
        for offset, length in fetched
        if data_start <= offset < data_start + params.share_data_size
    }
    assert blocks_read == {3}
    assert sum(length for offset, length in fetched) < 4 * params.block_size


def test_hostile_headers_and_uebs_raise_format_errors():
    for junk in (b"", b"\x00\x00\x00\x03" + bytes(64), b"\x00\x00\x00\x01" + bytes(10)):
        with pytest.raises(FormatError):
            parse_header(junk)
    backwards = (1).to_bytes(4, "big") + bytes(8) + (36).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(16)
    with pytest.raises(FormatError):
        parse_header(backwards)
    for junk in (b"codec_name:3:crs,", b"x" * 3000, b"key_without_value", b"size:1:x,"):
        with pytest.raises(FormatError):
            parse_uri_extension(junk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=0, max_value=6 * 1024),
    needed=st.integers(min_value=1, max_value=8),
    extra=st.integers(min_value=0, max_value=8),
    segment=st.integers(min_value=1, max_value=2048),
    seed=st.integers(min_value=0, max_value=2**32),
    data=st.data(),
)
def test_round_trip_random(size, needed, extra, segment, seed, data):
    total = needed + extra
    plaintext = random.Random(seed).randbytes(size)
    cap, shares = encode_bytes(plaintext, key=bytes(16), needed=needed, total=total, max_segment_size=segment)
    if size <= 55:
        assert isinstance(cap, LiteralCap) and cap.data == plaintext
        return
    kept = data.draw(st.lists(st.sampled_from(range(total)), min_size=needed, max_size=needed, unique=True))
    assert read_shares(cap, {s: shares[s] for s in kept}) == plaintext
    start = data.draw(st.integers(min_value=0, max_value=size))
    end = data.draw(st.integers(min_value=start, max_value=size))
    assert read_shares(cap, {s: shares[s] for s in kept}, start, end) == plaintext[start:end]


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=8), seed=st.integers(0, 99))
def test_chunking_does_not_change_the_shares(chunks, seed):
    plaintext = random.Random(seed).randbytes(sum(chunks) + 56)
    cap, shares = encode_bytes(plaintext, key=bytes(16), max_segment_size=1000)
    params = ChkParameters.for_size(len(plaintext), max_segment_size=1000)
    encoder = ChkEncoder(bytes(16), params)
    built = [bytearray(encoder.share_size) for _ in range(10)]
    pos = 0
    writes = []
    for n in [*chunks, 56]:
        writes += list(encoder.write(plaintext[pos : pos + n]))
        pos += n
    writes += list(encoder.finish())
    for write in writes:
        for share, piece in zip(built, write.data, strict=True):
            share[write.offset : write.offset + len(piece)] = piece
    assert encoder.cap == cap and [bytes(b) for b in built] == shares


def test_encoder_refuses_wrong_amount_of_data():
    params = ChkParameters.for_size(100)
    encoder = ChkEncoder(bytes(16), params)
    with pytest.raises(ValueError):
        list(encoder.write(b"x" * 101))
    encoder = ChkEncoder(bytes(16), params)
    list(encoder.write(b"x" * 99))
    with pytest.raises(ValueError):
        list(encoder.finish())


def test_encoder_refuses_to_finish_shares_of_another_file():
    """Regenerating shares under the wrong parameters stops before the trailers that complete any share."""
    data = os.urandom(300_000)
    cap, _shares = encode_bytes(data, key=bytes(16))
    assert isinstance(cap, ChkCap)
    wrong = ChkEncoder(bytes(16), ChkParameters.for_size(len(data), 3, 10, 64 * 1024), expected=cap)
    writes = list(wrong.write(data))
    with pytest.raises(ReencodingMismatchError):
        writes += list(wrong.finish())
    assert wrong.cap is None
    assert max(w.offset for w in writes) < wrong.offsets.plaintext_hash_tree
    right = ChkEncoder(bytes(16), ChkParameters.for_size(len(data), 3, 10), expected=cap)
    list(right.write(data))
    list(right.finish())
    assert right.cap == cap


def test_errors_are_lafs_errors():
    assert issubclass(NotEnoughSharesError, LafsError) and issubclass(FormatError, LafsError)


def _reader(data):
    return lambda offset, length: data[offset : offset + length]


def _with_corrupt_ueb(share: bytes) -> bytes:
    offsets = parse_header(share)
    raw = bytearray(share)
    raw[offsets.uri_extension + offsets.fieldsize + 5] ^= 0x01
    return bytes(raw)


def test_a_cap_that_matches_no_share_is_not_corruption(sample):
    _data, cap, shares = sample
    mistyped = dataclasses.replace(cap, ueb_hash=bytes(32))
    reader = ChkReader(mistyped, range(10))
    with pytest.raises(CapMismatchError, match="no file on the grid matches this cap"):
        drive(reader.read(0, cap.size), {s: _reader(shares[s]) for s in range(10)})
    assert len(reader.bad_shares) == 10 and reader.corrupt_shares == {}  # every share was looked at


def test_shares_whose_ueb_is_not_the_one_others_match_are_corrupt(sample):
    data, cap, shares = sample
    damaged = {s: _with_corrupt_ueb(shares[s]) if s < 8 else shares[s] for s in range(10)}
    reader = ChkReader(cap, range(10))
    with pytest.raises(NotEnoughSharesError) as info:
        drive(reader.read(0, cap.size), {s: _reader(damaged[s]) for s in range(10)})
    assert not isinstance(info.value, CapMismatchError)
    assert sorted(reader.corrupt_shares) == list(range(8))
    damaged[7] = shares[7]
    reader = ChkReader(cap, range(10))
    assert drive(reader.read(0, cap.size), {s: _reader(damaged[s]) for s in range(10)}) == data
    assert sorted(reader.corrupt_shares) == list(range(7))
