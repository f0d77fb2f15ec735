import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lafs_core import base32
from lafs_core.caps import (
    ChkCap,
    ChkVerifierCap,
    DirectoryCap,
    LiteralCap,
    MdmfReadCap,
    MdmfWriteCap,
    SskReadCap,
    SskVerifierCap,
    SskWriteCap,
    UnknownCap,
    parse_cap,
    parse_known_cap,
)
from lafs_core.errors import CapError

from .shared_data import SAMPLE_GRID, cap_vectors, sample_caps


@pytest.mark.parametrize("vector", cap_vectors(), ids=lambda v: v.expected[:24])
def test_every_vector_cap_parses_and_formats_back(vector):
    cap = parse_known_cap(vector.expected)
    assert str(cap) == vector.expected


def _listing_children(name):
    listing = json.loads((SAMPLE_GRID / name).read_text())
    yield listing[1]
    for _child, (_kind, info) in listing[1]["children"].items():
        yield info


@pytest.mark.parametrize("listing", ["root-listing.json", "sub-mdmf-listing.json"])
def test_derived_caps_match_tahoe_listing(listing):
    checked = 0
    for info in _listing_children(listing):
        strongest = parse_known_cap(info.get("rw_uri") or info["ro_uri"])
        assert str(strongest.readonly()) == info["ro_uri"]
        verifier = strongest.verifier()
        if "verify_uri" in info:
            assert str(verifier) == info["verify_uri"]
            assert str(parse_known_cap(info["ro_uri"]).verifier()) == info["verify_uri"]
        else:
            assert verifier is None  # LIT caps have nothing to verify
        checked += 1
    assert checked >= 3


def test_kinds_of_sample_caps():
    kinds = {name: type(parse_known_cap(cap)) for name, cap in sample_caps().items()}
    assert kinds["chk-1k"] is ChkCap and kinds["lit-0"] is LiteralCap
    assert kinds["mut-sdmf-text"] is SskWriteCap and kinds["mut-mdmf-300k"] is MdmfWriteCap
    for name in ("root", "sub-mdmf", "imm-dir"):
        assert kinds[name] is DirectoryCap
    imm = parse_known_cap(sample_caps()["imm-dir"])
    assert not imm.is_mutable and imm.is_readonly and isinstance(imm.file_cap, ChkCap)
    root = parse_known_cap(sample_caps()["root"])
    assert root.is_mutable and not root.is_readonly and root.readonly().is_readonly


def test_lit_caps():
    assert parse_cap("URI:LIT:") == LiteralCap(b"")
    assert parse_cap("URI:LIT:nbswy3dp") == LiteralCap(b"hello")
    assert str(DirectoryCap(LiteralCap(b"data"))) == "URI:DIR2-LIT:mrqxiyi"
    assert parse_cap("URI:DIR2-LIT:mrqxiyi") == DirectoryCap(LiteralCap(b"data"))


def test_tahoe_uri_test_example():
    # src/allmydata/test/test_uri.py: key \x01*16 with uri_extension_hash(b"stuff")
    cap = parse_known_cap(
        "URI:CHK:aeaqcaibaeaqcaibaeaqcaibae:nf3nimquen7aeqm36ekgxomalstenpkvsdmf6fplj7swdatbv5oa:3:10:1234"
    )
    assert cap.key == b"\x01" * 16
    from lafs_core.hashes import uri_extension_hash

    assert cap.ueb_hash == uri_extension_hash(b"stuff")


GOOD_KEY = base32.encode(bytes(range(16)))
GOOD_HASH = base32.encode(bytes(range(32)))


@pytest.mark.parametrize(
    "text",
    [
        f"URI:CHK:{GOOD_KEY}:{GOOD_HASH}:3:10",  # missing size
        f"URI:CHK:{GOOD_KEY}:{GOOD_HASH}:3:10:abc",
        f"URI:CHK:{GOOD_KEY}:{GOOD_HASH}:0:10:100",  # k = 0
        f"URI:CHK:{GOOD_KEY}:{GOOD_HASH}:11:10:100",  # k > N
        f"URI:CHK:{GOOD_KEY}:{GOOD_HASH}:3:257:100",  # N > 256
        f"URI:CHK:{GOOD_KEY}:{GOOD_HASH}:03:10:100",  # leading zero
        f"URI:CHK:{GOOD_KEY[:-1]}b:{GOOD_HASH}:3:10:100",  # non-canonical last char
        f"URI:CHK:{GOOD_KEY}x:{GOOD_HASH}:3:10:100",  # too long
        f"URI:SSK:{GOOD_KEY}:{GOOD_HASH}:extra",  # SSK caps are anchored
        f"URI:SSK-RO:{GOOD_KEY}",
        f"URI:MDMF:{GOOD_KEY}",
        f"URI:DIR2:{GOOD_KEY}:{GOOD_HASH[:-1]}b",
        "URI:LIT:nbswy3dpbj",
        "URI:LIT:NBSWY3DP",
    ],
)
def test_malformed_caps_are_rejected(text):
    with pytest.raises(CapError):
        parse_cap(text)


def test_mdmf_extension_is_accepted_and_dropped():
    base = f"URI:MDMF:{GOOD_KEY}:{GOOD_HASH}"
    assert str(parse_cap(base + ":3:131073")) == base


def test_unknown_caps_are_kept_verbatim():
    for text in ["x-tahoe-future-cap:abc", "URI:NEWKIND:abc", "", "URI:"]:
        cap = parse_cap(text)
        assert isinstance(cap, UnknownCap) and str(cap) == text
        with pytest.raises(CapError):
            parse_known_cap(text)


def test_prefixes_in_directory_context():
    ssk = f"URI:SSK:{GOOD_KEY}:{GOOD_HASH}"
    ro = str(parse_cap(ssk).readonly())
    assert isinstance(parse_cap("ro." + ro, allow_prefixes=True), SskReadCap)
    # A write cap under "ro." or a mutable cap under "imm." is not usable as such.
    assert isinstance(parse_cap("ro." + ssk, allow_prefixes=True), UnknownCap)
    assert isinstance(parse_cap("imm." + ro, allow_prefixes=True), UnknownCap)
    chk = f"URI:CHK:{GOOD_KEY}:{GOOD_HASH}:3:10:100"
    assert isinstance(parse_cap("imm." + chk, allow_prefixes=True), ChkCap)
    # Without allow_prefixes they are just unknown strings.
    assert isinstance(parse_cap("ro." + ro), UnknownCap)


def test_derivations_by_kind():
    write = SskWriteCap(bytes(16), bytes(32))
    assert isinstance(write.readonly(), SskReadCap)
    assert isinstance(write.verifier(), SskVerifierCap)
    assert write.readonly().verifier() == write.verifier()
    assert write.storage_index == write.verifier().storage_index
    mdmf = MdmfWriteCap(bytes(16), bytes(32))
    assert isinstance(mdmf.readonly(), MdmfReadCap)
    directory = DirectoryCap(mdmf)
    assert str(directory).startswith("URI:DIR2-MDMF:")
    assert str(directory.readonly()).startswith("URI:DIR2-MDMF-RO:")
    assert str(directory.verifier()).startswith("URI:DIR2-MDMF-Verifier:")
    chk = ChkCap(bytes(16), bytes(32), 3, 10, 1000)
    assert isinstance(chk.verifier(), ChkVerifierCap) and chk.readonly() is chk


keys = st.binary(min_size=16, max_size=16)
hashes32 = st.binary(min_size=32, max_size=32)
mutable_kinds = st.sampled_from([SskWriteCap, SskReadCap, SskVerifierCap, MdmfWriteCap, MdmfReadCap])
caps = st.one_of(
    st.builds(LiteralCap, st.binary(max_size=55)),
    st.builds(
        ChkCap,
        keys,
        hashes32,
        st.integers(1, 128),
        st.just(256),
        st.integers(56, 2**63),
    ),
    st.builds(lambda cls, k, f: cls(k, f), mutable_kinds, keys, hashes32),
)


@given(st.one_of(caps, st.builds(DirectoryCap, caps)))
def test_round_trip(cap):
    assert parse_cap(str(cap)) == cap


@given(st.text(max_size=120))
def test_parser_never_crashes(text):
    with contextlib.suppress(CapError):
        parse_cap(text, allow_prefixes=True)


@pytest.mark.parametrize("prefix", ["URI:DIR2:", "URI:DIR2-MDMF-RO:", "URI:SSK:", "URI:CHK:", "URI:DIR2-CHK:"])
def test_a_malformed_cap_is_named_by_the_kind_typed_and_never_shown(prefix):
    body = f"{GOOD_KEY}:{GOOD_HASH}:3:10:100" if "CHK" in prefix else f"{GOOD_KEY}:{GOOD_HASH}"
    with pytest.raises(CapError) as raised:
        parse_cap(prefix + body[:-7])  # truncated
    assert str(raised.value) == f"not a valid cap: {prefix}... is truncated or malformed"
