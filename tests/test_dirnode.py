"""Directories: the three sample-grid directories exactly as Tahoe lists them, and our own round trips."""

import contextlib
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lafs_core import rsa
from lafs_core.caps import ChkCap, DirectoryCap, LiteralCap, SskWriteCap, UnknownCap, parse_known_cap
from lafs_core.dirnode import (
    DirEntry,
    child_entry,
    decrypt_rwcapdata,
    encrypt_rw_uri,
    pack_directory,
    unpack_directory,
    update_metadata,
)
from lafs_core.errors import FormatError
from lafs_core.hashes import tahoe_hmac
from lafs_core.immutable.decode import read_shares
from lafs_core.mutable.encode import encode_version
from lafs_core.mutable.keys import WriterKeys, writer_keys_from_share
from lafs_core.mutable.layout import MDMF_VERSION
from lafs_core.mutable.retrieve import ShareRef, map_shares, read_mutable
from lafs_core.netstring import split_netstrings

from .shared_data import SAMPLE_GRID, sample_caps, sample_shares


def listing(name):
    return json.loads((SAMPLE_GRID / name).read_text())[1]["children"]


def read_sample_dir(name):
    cap = parse_known_cap(sample_caps()[name])
    inner = cap.file_cap
    shares = sample_shares(cap.storage_index)
    if isinstance(inner, ChkCap):
        data = read_shares(inner, {ref.shnum: d for ref, d in shares.items()})
        return cap, data, unpack_directory(data, None, mutable=False)
    data = read_mutable(inner, shares)
    return cap, data, unpack_directory(data, inner.writekey)


@pytest.mark.parametrize(
    ("name", "listing_file"), [("root", "root-listing.json"), ("sub-mdmf", "sub-mdmf-listing.json")]
)
def test_sample_directories_match_tahoe_listing(name, listing_file):
    _cap, _data, children = read_sample_dir(name)
    expected = listing(listing_file)
    assert set(children) == set(expected)
    for child_name, entry in children.items():
        info = expected[child_name][1]
        assert entry.ro_uri == info["ro_uri"]
        assert entry.rw_uri == info.get("rw_uri")
        assert entry.metadata == info["metadata"]


def test_non_ascii_name_survives():
    _cap, data, children = read_sample_dir("sub-mdmf")
    assert "ünïcode name.txt" in children
    assert "ünïcode name.txt".encode() in data


def test_immutable_directory():
    cap, _data, children = read_sample_dir("imm-dir")
    assert not cap.is_mutable
    for entry in children.values():
        assert entry.rw_uri is None
        assert not parse_known_cap(entry.ro_uri).is_mutable
    root = listing("root-listing.json")
    assert root["imm-dir"][1]["ro_uri"] == sample_caps()["imm-dir"]
    assert children  # the sample immutable directory is not empty


@pytest.mark.parametrize("name", ["root", "sub-mdmf"])
def test_reencrypting_child_write_caps_reproduces_the_stored_bytes(name):
    cap, data, children = read_sample_dir(name)
    writekey = cap.file_cap.writekey
    stored = {}
    for entry_bytes in split_netstrings(data):
        child_name, _ro, rwcapdata, _md = split_netstrings(entry_bytes, required=4)
        stored[child_name.decode()] = rwcapdata
    for child_name, entry in children.items():
        assert encrypt_rw_uri(writekey, (entry.rw_uri or "").encode()) == stored[child_name]
        assert decrypt_rwcapdata(writekey, stored[child_name]) == (entry.rw_uri or "").encode()
    # Repacking from scratch (no reused bytes) gives the very same plaintext.
    fresh = {n: replace(e, packed=None) for n, e in children.items()}
    assert pack_directory(fresh, writekey) == data


def test_new_version_of_a_sample_directory():
    """Add a child to the fixture's SDMF root with lafs_core, publish it as Tahoe would, read it back."""
    cap, _data, children = read_sample_dir("root")
    shares = sample_shares(cap.storage_index)
    servermap = map_shares(cap.file_cap, shares)
    old = servermap.best_version()
    keys = writer_keys_from_share(cap.file_cap, next(iter(servermap.headers.values())).enc_privkey)
    new_child = child_entry("URI:LIT:nbswy3dp", update_metadata(None, {"mode": 420}, 1_800_000_000.5))
    changed = {**children, "added.txt": new_child}
    plaintext = pack_directory(changed, cap.file_cap.writekey)
    version = encode_version(keys, old.seqnum + 1, plaintext, old.needed, old.total, old.version)
    new_shares = {ShareRef("s", i): share for i, share in enumerate(version.shares)}
    reread = unpack_directory(read_mutable(cap.file_cap, new_shares), cap.file_cap.writekey)
    assert reread == changed
    assert reread["added.txt"].metadata == {
        "mode": 420,
        "tahoe": {"linkcrtime": 1_800_000_000.5, "linkmotime": 1_800_000_000.5},
    }
    # Entries we did not touch kept their bytes exactly.
    assert all(reread[n].packed == children[n].packed for n in children)


def test_directory_written_by_lafs_core_parses_like_tahoes():
    keys = WriterKeys.from_private_key(rsa.generate_private_key())
    dircap = DirectoryCap(keys.cap("MDMF"))
    sub = WriterKeys.from_private_key(rsa.generate_private_key())
    children = {
        "file": child_entry(
            ChkCap(bytes(16), bytes(32), 3, 10, 100), {"tahoe": {"linkcrtime": 1.0, "linkmotime": 2.0}}
        ),
        "subdir": child_entry(DirectoryCap(sub.cap()), {}),
        "read-only": child_entry(DirectoryCap(sub.cap()).readonly(), {}),
        "tiny": child_entry(LiteralCap(b"hi"), {}),
    }
    plaintext = pack_directory(children, dircap.file_cap.writekey)
    version = encode_version(keys, 1, plaintext, 3, 10, MDMF_VERSION)
    shares = {ShareRef("s", i): s for i, s in enumerate(version.shares)}
    data = read_mutable(dircap.file_cap, shares)
    parsed = unpack_directory(data, dircap.file_cap.writekey)
    assert parsed == children
    assert parsed["subdir"].rw_uri == str(DirectoryCap(sub.cap()))
    assert parsed["read-only"].rw_uri is None
    # A reader with only the read cap sees read caps only.
    read_view = unpack_directory(data, None)
    assert read_view["subdir"].rw_uri is None and read_view["subdir"].ro_uri == children["subdir"].ro_uri


def test_unknown_caps_and_metadata_survive_read_modify_write():
    writekey = bytes(range(16))
    odd = DirEntry("x-tahoe-future-write:abc", "ro.x-tahoe-future-read:def", {"future-key": [1, 2], "tahoe": {}})
    data = pack_directory({"odd": odd, "plain": child_entry("URI:LIT:", {})}, writekey)
    children = unpack_directory(data, writekey)
    assert isinstance(children["odd"].cap, UnknownCap)
    # A read-cap slot implies read-only, so Tahoe stores it without the "ro." prefix.
    assert children["odd"] == DirEntry("x-tahoe-future-write:abc", "x-tahoe-future-read:def", odd.metadata)
    children["plain"] = children["plain"].with_metadata({"changed": True})
    repacked = pack_directory(children, writekey)
    again = unpack_directory(repacked, writekey)
    assert again["odd"] == children["odd"] and again["odd"].metadata == {"future-key": [1, 2], "tahoe": {}}
    assert again["plain"].metadata == {"changed": True}
    assert split_netstrings(repacked)[0] == split_netstrings(data)[0]  # the unknown entry's bytes, unchanged


def test_names_are_nfc_and_sorted_by_code_point():
    data = pack_directory(
        {"b": child_entry("URI:LIT:"), "A": child_entry("URI:LIT:"), "e\u0301": child_entry("URI:LIT:")}, None
    )
    names = [split_netstrings(e, required=4)[0].decode() for e in split_netstrings(data)]
    assert names == ["A", "b", "\u00e9"]
    with pytest.raises(FormatError):
        pack_directory({"\u00e9": child_entry("URI:LIT:"), "e\u0301": child_entry("URI:LIT:")}, None)


def test_example_entry_format_from_tahoe_tests():
    # test_dirnode.py: a LIT directory holding one child "short".
    data = b"41:5:short,21:URI:LIT:krugkidfnzsc4,0:,2:{},,"
    children = unpack_directory(data, None, mutable=False)
    assert children == {"short": DirEntry(None, "URI:LIT:krugkidfnzsc4", {})}
    assert pack_directory({"short": DirEntry(None, "URI:LIT:krugkidfnzsc4", {})}, None, deep_immutable=True) == data


def test_update_metadata_follows_tahoe():
    first = update_metadata(None, None, 10.0)
    assert first == {"tahoe": {"linkcrtime": 10.0, "linkmotime": 10.0}}
    second = update_metadata(first, {"mode": 1, "tahoe": {"evil": 1}}, 20.0)
    assert second == {"mode": 1, "tahoe": {"linkcrtime": 10.0, "linkmotime": 20.0}}
    legacy = update_metadata({"ctime": 5.0, "mtime": 6.0}, None, 30.0)
    assert legacy["tahoe"] == {"linkcrtime": 5.0, "linkmotime": 30.0}


def test_write_caps_refused_in_immutable_directories():
    with pytest.raises(FormatError):
        pack_directory({"w": child_entry(str(SskWriteCap(bytes(16), bytes(32))))}, None, deep_immutable=True)
    with pytest.raises(FormatError):
        unpack_directory(b"38:1:a,16:URI:LIT:mfrggzdf,4:abcd,2:{},,", None, mutable=False)


def test_mac_is_tahoes_hmac():
    writekey = bytes(16)
    blob = encrypt_rw_uri(writekey, b"URI:LIT:")
    from lafs_core.hashes import mutable_rwcap_key_hash

    key = mutable_rwcap_key_hash(blob[:16], writekey)
    assert blob[-32:] == tahoe_hmac(key, blob[:-32])


names = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
caps = st.sampled_from(
    [
        "URI:LIT:",
        "URI:LIT:nbswy3dp",
        str(ChkCap(bytes(16), bytes(32), 3, 10, 1000)),
        str(DirectoryCap(SskWriteCap(bytes(range(16)), bytes(32)))),
        str(DirectoryCap(SskWriteCap(bytes(range(16)), bytes(32))).readonly()),
        "x-tahoe-unknown:zzz",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(names, st.tuples(caps, st.dictionaries(st.text(max_size=8), json_values, max_size=4)), max_size=8)
)
def test_round_trip_random_directories(spec):
    import unicodedata

    children = {}
    for name, (cap, metadata) in spec.items():
        children.setdefault(unicodedata.normalize("NFC", name), child_entry(cap, metadata))
    writekey = bytes(range(16))
    data = pack_directory(children, writekey)
    assert unpack_directory(data, writekey) == children
    assert pack_directory(unpack_directory(data, writekey), writekey) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_unpack_never_crashes(data):
    with contextlib.suppress(FormatError):
        unpack_directory(data, bytes(16))
