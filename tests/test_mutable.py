"""SDMF and MDMF mutable files: Tahoe's vectors, the legacy shares, and the real 1.20.0 shares of the sample grid."""

import base64
import contextlib
import random
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lafs_core import rsa
from lafs_core.caps import MdmfWriteCap, MutableWriteCap, SskWriteCap, parse_known_cap
from lafs_core.errors import FormatError
from lafs_core.fetch import bytes_reader, drive
from lafs_core.hashes import SALT_SIZE
from lafs_core.mutable.encode import encode_version
from lafs_core.mutable.keys import MDMF, SDMF, WriterKeys, writer_keys_from_share
from lafs_core.mutable.layout import (
    MDMF_SHARE_DATA_OFFSET,
    MDMF_VERSION,
    SDMF_VERSION,
    NeedMoreData,
    parse_share_header,
)
from lafs_core.mutable.publish import mdmf_update_vectors, publish_vectors
from lafs_core.mutable.retrieve import (
    MutableReader,
    ServerMap,
    ShareRef,
    UnrecoverableFileError,
    checked_block_tree_leaves,
    map_shares,
    read_mutable,
)
from lafs_core.mutable.slot import all_tests_hold, apply_writes
from lafs_core.storage.containers import MUTABLE_DATA_OFFSET, parse_mutable_header

from .shared_data import SAMPLE_GRID, cap_vectors, load_yaml, sample_caps, sample_plaintext, sample_shares

SSK_VECTORS = [v for v in cap_vectors() if v.kind == "ssk"]


@cache
def fresh_keys() -> WriterKeys:
    return WriterKeys.from_private_key(rsa.generate_private_key())


def test_there_are_240_ssk_vectors():
    assert len(SSK_VECTORS) == 240
    assert {v.mutable_format for v in SSK_VECTORS} == {"sdmf", "mdmf"}


@pytest.mark.parametrize("vector", SSK_VECTORS, ids=lambda v: v.expected[:30])
def test_ssk_vector(vector):
    keys = WriterKeys.from_private_key(rsa.load_private_key_pem(vector.key_pem.encode()))
    cap = keys.cap(MDMF if vector.mutable_format == "mdmf" else SDMF)
    assert str(cap) == vector.expected


def test_new_keys_use_65537_and_2048_bits():
    key = fresh_keys().private_key
    assert key.key_size == 2048 and key.public_key().public_numbers().e == 65537
    assert len(fresh_keys().public_key_der) == 294


# --- the sample grid ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "cls"), [("mut-sdmf-text", SskWriteCap), ("mut-mdmf-300k", MdmfWriteCap)])
def test_sample_mutable_files_read_back(name, cls):
    cap = parse_known_cap(sample_caps()[name])
    assert isinstance(cap, cls)
    shares = sample_shares(cap.storage_index)
    assert len(shares) == 10
    assert read_mutable(cap, shares) == sample_plaintext(name)
    assert read_mutable(cap.readonly(), shares) == sample_plaintext(name)


def test_mdmf_fixture_offsets_match_the_spec():
    cap = parse_known_cap(sample_caps()["mut-mdmf-300k"])
    header = parse_share_header(next(iter(sample_shares(cap.storage_index).values())))
    o = header.offsets
    # The spec's example share had offsets 123,1340,1476,1732,2026,2167,102215,102439; the encrypted key's
    # length varies by a byte or two between keys, the rest is fixed.
    assert o.enc_privkey == 123 and 1216 <= o.share_hash_chain - 123 <= 1220
    assert (o.signature - o.share_hash_chain, o.verification_key - o.signature) == (4 * 34, 256)
    assert o.verification_key_end - o.verification_key == 294
    assert (o.share_data, o.block_hash_tree, o.eof) == (2167, 102215, 102439)
    assert header.prefix.segment_size == 131073 and header.prefix.num_segments == 3


@pytest.mark.parametrize("name", ["mut-sdmf-text", "mut-mdmf-300k"])
def test_reencoding_with_tahoes_salts_reproduces_the_shares(name):
    """Everything but the (randomized PSS) signature is byte-identical to what Tahoe 1.20.0 wrote."""
    cap = parse_known_cap(sample_caps()[name])
    shares = sample_shares(cap.storage_index)
    by_shnum = {ref.shnum: data for ref, data in shares.items()}
    header = parse_share_header(by_shnum[0])
    keys = writer_keys_from_share(cap, header.enc_privkey)
    prefix = header.prefix
    if prefix.version == SDMF_VERSION:
        salts = [prefix.salt]
    else:
        salts = [by_shnum[0][MDMF_SHARE_DATA_OFFSET + i * (prefix.block_size + 16) :][:16] for i in range(3)]
    supply = iter(salts)
    version = encode_version(
        keys, prefix.seqnum, sample_plaintext(name), prefix.needed, prefix.total, prefix.version, lambda n: next(supply)
    )
    assert version.prefix == prefix
    for shnum, ours in enumerate(version.shares):
        theirs = by_shnum[shnum][: len(ours)]
        o = header.offsets
        sig_end = o.signature + len(header.signature)
        assert ours[: o.signature] == theirs[: o.signature]
        assert ours[sig_end:] == theirs[sig_end:]
        ours_header = parse_share_header(ours)
        assert rsa.verify(
            rsa.load_public_key_der(ours_header.verification_key),
            ours_header.signature,
            ours[:75][: len(ours_header.signed_bytes)],
        )


def test_legacy_sdmf_shares_decode():
    vector = load_yaml("legacy-sdmf-shares.yaml")
    cap = parse_known_cap(vector["cap"])
    shares = {}
    for shnum, b64 in vector["shares_base64"].items():
        container = base64.b64decode(b64)
        header = parse_mutable_header(container)
        assert header.magic.startswith(b"Tahoe mutable container v1\n")
        shares[ShareRef("legacy", int(shnum))] = container[
            MUTABLE_DATA_OFFSET : MUTABLE_DATA_OFFSET + header.data_length
        ]
    assert read_mutable(cap, shares) == vector["plaintext"].encode()
    key = rsa.load_public_key_der(parse_share_header(next(iter(shares.values()))).verification_key)
    assert key.public_numbers().e == 17


# --- our own files -------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([0, 1, 55, 1000, 131073, 131074, 300_000]),
    version=st.sampled_from([SDMF_VERSION, MDMF_VERSION]),
    needed=st.integers(1, 5),
    extra=st.integers(0, 5),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_round_trip(size, version, needed, extra, seed, data):
    plaintext = random.Random(seed).randbytes(size)
    keys = fresh_keys()
    total = needed + extra
    encoded = encode_version(keys, 1, plaintext, needed, total, version)
    kept = data.draw(st.lists(st.sampled_from(range(total)), min_size=needed, max_size=needed, unique=True))
    shares = {ShareRef("s", shnum): encoded.shares[shnum] for shnum in kept}
    assert read_mutable(keys.cap(MDMF if version else SDMF), shares) == plaintext


def _flip(data: bytes, position: int) -> bytes:
    raw = bytearray(data)
    raw[position] ^= 0x01
    return bytes(raw)


def test_corruption_anywhere_is_survived_or_refused_never_misread():
    keys = fresh_keys()
    plaintext = random.Random(1).randbytes(300_000)
    encoded = encode_version(keys, 1, plaintext, 3, 10, MDMF_VERSION)
    cap = keys.cap(MDMF)
    rng = random.Random(2)
    size = len(encoded.shares[0])
    for position in [*range(0, 200), *rng.sample(range(size), 200)]:
        shares = {ShareRef("s", i): encoded.shares[i] for i in range(10)}
        shares[ShareRef("s", 0)] = _flip(encoded.shares[0], position)
        assert read_mutable(cap, shares) == plaintext
    # Corrupt seven shares in the first segment's block: only three good ones remain, enough.
    shares = {ShareRef("s", i): _flip(encoded.shares[i], MDMF_SHARE_DATA_OFFSET + 100) for i in range(7)}
    shares.update({ShareRef("s", i): encoded.shares[i] for i in range(7, 10)})
    assert read_mutable(cap, shares) == plaintext
    # Eight bad shares: an error, not wrong bytes.
    shares = {ShareRef("s", i): _flip(encoded.shares[i], MDMF_SHARE_DATA_OFFSET + 100) for i in range(8)}
    shares.update({ShareRef("s", i): encoded.shares[i] for i in range(8, 10)})
    with pytest.raises(Exception) as info:
        read_mutable(cap, shares)
    assert "usable shares" in str(info.value)


def test_wrong_signature_and_wrong_key_are_refused():
    keys, other = fresh_keys(), WriterKeys.from_private_key(rsa.generate_private_key())
    encoded = encode_version(keys, 1, b"signed content", 3, 10)
    header = parse_share_header(encoded.shares[0])
    servermap = ServerMap(keys.fingerprint)
    bad_sig = _flip(encoded.shares[0], header.offsets.signature + 5)
    assert servermap.add_share(ShareRef("a", 0), bad_sig) is None
    assert "signature" in servermap.bad_shares[ShareRef("a", 0)]
    foreign = encode_version(other, 1, b"signed content", 3, 10).shares[1]
    assert servermap.add_share(ShareRef("a", 1), foreign) is None
    assert "fingerprint" in servermap.bad_shares[ShareRef("a", 1)]
    bumped = _flip(encoded.shares[2], 8)  # seqnum changed without re-signing
    assert servermap.add_share(ShareRef("a", 2), bumped) is None
    with pytest.raises(UnrecoverableFileError):
        read_mutable(keys.cap(), {ShareRef("a", 0): bad_sig, ShareRef("a", 1): foreign})


def test_truncated_headers_ask_for_more_and_garbage_is_refused():
    encoded = encode_version(fresh_keys(), 1, b"x" * 100, 3, 10, MDMF_VERSION)
    with pytest.raises(NeedMoreData) as info:
        parse_share_header(encoded.shares[0][:500])
    assert info.value.length > 500
    parse_share_header(encoded.shares[0][: info.value.length])
    for junk in (b"\x02" + bytes(200), b"", b"\x00" + bytes(120), b"\x01" + b"\xff" * 200):
        with pytest.raises(FormatError):
            parse_share_header(junk)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_header_parser_never_crashes(data):
    with contextlib.suppress(FormatError):
        parse_share_header(data)


def test_newest_recoverable_version_wins():
    keys = fresh_keys()
    old = encode_version(keys, 1, b"old contents", 3, 10)
    new = encode_version(keys, 2, b"new contents", 3, 10)
    shares = {ShareRef(f"s{i}", i): old.shares[i] for i in range(10)}
    # Two shares of seqnum 2 are not enough to recover it: the reader falls back to seqnum 1 ...
    shares.update({ShareRef(f"s{i}", i): new.shares[i] for i in range(2)})
    servermap = map_shares(keys.cap(), shares)
    assert servermap.highest_seqnum() == 2 and servermap.best_version().seqnum == 1
    assert read_mutable(keys.cap(), shares) == b"old contents"
    # ... and three are.
    shares[ShareRef("s2", 2)] = new.shares[2]
    assert read_mutable(keys.cap(), shares) == b"new contents"


# --- writing over an existing version ----------------------------------------------------------------------------
def _fixture_slots(name):
    cap = parse_known_cap(sample_caps()[name])
    return cap, sample_shares(cap.storage_index)


@pytest.mark.parametrize("name", ["mut-sdmf-text", "mut-mdmf-300k"])
def test_update_vectors_pass_on_the_fixture_and_fail_after_another_writer(name):
    cap, shares = _fixture_slots(name)
    servermap = map_shares(cap, shares)
    old = servermap.best_version()
    header = next(iter(servermap.headers.values()))
    keys = writer_keys_from_share(cap, header.enc_privkey)
    new = encode_version(keys, old.seqnum + 1, b"replacement contents", old.needed, old.total, old.version)
    vectors = publish_vectors(new.shares, servermap.headers, servermap)
    assert set(vectors) == set(shares)
    for ref, vector in vectors.items():
        assert all_tests_hold(bytes_reader(shares[ref]), vector.tests)
    # Another writer bumped one share's seqnum first: our write to it must be refused.
    victim = next(iter(shares))
    other = encode_version(keys, old.seqnum + 1, b"the other writer", old.needed, old.total, old.version)
    assert not all_tests_hold(bytes_reader(other.shares[victim.shnum]), vectors[victim].tests)
    # A share we believe absent must still be absent.
    assert all_tests_hold(None, publish_vectors(new.shares, [ShareRef("new", 0)], servermap)[ShareRef("new", 0)].tests)
    assert not all_tests_hold(
        bytes_reader(b"x"), publish_vectors(new.shares, [ShareRef("new", 0)], servermap)[ShareRef("new", 0)].tests
    )
    # Applying our writes gives a file that reads as the new contents.
    written = {ref: apply_writes(shares[ref], vec.writes, vec.new_length) for ref, vec in vectors.items()}
    assert read_mutable(cap, written) == b"replacement contents"


def test_mdmf_partial_update_rewrites_only_the_changed_segments():
    cap, shares = _fixture_slots("mut-mdmf-300k")
    servermap = map_shares(cap, shares)
    old = servermap.best_version()
    refs = sorted(servermap.shares_of(old))
    keys = writer_keys_from_share(cap, servermap.headers[refs[0]].enc_privkey)
    leaves = {}
    for ref in refs:
        header = servermap.headers[ref]
        tree = shares[ref][header.offsets.block_hash_tree : header.offsets.eof]
        leaves[ref.shnum] = checked_block_tree_leaves(old, header, ref.shnum, tree)
    original = sample_plaintext("mut-mdmf-300k")
    segsize = old.segment_size
    replacement = bytes(range(256)) * 600  # 153600 bytes from segment 1 on: grows the file too
    new, vectors = mdmf_update_vectors(keys, servermap, old, leaves, 1, replacement)
    assert new.seqnum == old.seqnum + 1 and new.data_length == segsize + len(replacement)
    for vector in vectors.values():
        data_writes = [w for w in vector.writes if MDMF_SHARE_DATA_OFFSET <= w.offset < new.segment_size * 10]
        assert all(w.offset >= MDMF_SHARE_DATA_OFFSET + (old.block_size + SALT_SIZE) for w in data_writes)
    updated = {ref: apply_writes(shares[ref], vec.writes, vec.new_length) for ref, vec in vectors.items()}
    assert read_mutable(cap, updated) == original[:segsize] + replacement
    # Segment 0 of every share is untouched on disk.
    first = slice(MDMF_SHARE_DATA_OFFSET, MDMF_SHARE_DATA_OFFSET + old.block_size + SALT_SIZE)
    assert all(updated[ref][first] == shares[ref][first] for ref in refs)


def test_reader_reads_single_segments():
    cap, shares = _fixture_slots("mut-mdmf-300k")
    servermap = map_shares(cap, shares)
    version = servermap.best_version()
    reader = MutableReader(cap.readkey, servermap, version)
    readers = {ref: bytes_reader(data) for ref, data in shares.items()}
    plaintext = sample_plaintext("mut-mdmf-300k")
    assert drive(reader.read(200_000, 200_100), readers) == plaintext[200_000:200_100]


def test_fixture_dir_has_no_stray_types():
    assert isinstance(parse_known_cap(sample_caps()["root"]).file_cap, MutableWriteCap)
    assert (SAMPLE_GRID / "root-listing.json").exists()
