import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lafs_core import base32
from lafs_core.errors import FormatError
from lafs_core.netstring import netstring, read_netstring, split_netstrings


def test_known_encodings():
    assert base32.encode(b"") == ""
    assert base32.encode(b"hello") == "nbswy3dp"
    assert base32.encode(b"hello\n") == "nbswy3dpbi"
    assert base32.decode("nbswy3dpbi") == b"hello\n"


@given(st.binary(max_size=200))
def test_round_trip(data):
    text = base32.encode(data)
    assert text == text.lower() and "=" not in text
    assert len(text) == base32.encoded_length(len(data))
    assert base32.decode(text) == data


@pytest.mark.parametrize(
    "text",
    [
        "nbswy3dpbj",  # last character carries non-zero unused bits
        "nbswy3d",  # the same fault on a 7-character string
        "NBSWY3DP",  # upper case
        "nbswy3dp=",  # padding
        "nbswy3d1",  # not in the alphabet
        "a",  # one character cannot hold a whole byte
        "abc",  # nor can three hold a whole number of bytes
    ],
)
def test_non_canonical_rejected(text):
    assert not base32.is_canonical(text)
    with pytest.raises(FormatError):
        base32.decode(text)


@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0, max_value=31))
def test_only_the_canonical_last_character_decodes(data, replacement):
    text = base32.encode(data)
    altered = text[:-1] + base32.ALPHABET[replacement]
    if altered == text:
        return
    try:
        decoded = base32.decode(altered)
    except FormatError:
        return
    assert decoded != data  # a different last character that decodes must mean different bytes


def test_netstring():
    assert netstring(b"abc") == b"3:abc,"
    assert netstring(b"") == b"0:,"
    assert read_netstring(b"3:abc,5:hello,", 6) == (b"hello", 14)


@given(st.lists(st.binary(max_size=50), max_size=10))
def test_netstring_round_trip(items):
    assert split_netstrings(b"".join(netstring(i) for i in items)) == items


@pytest.mark.parametrize("bad", [b"3:ab,", b"3:abcd", b"x:abc,", b"03:abc,", b"3abc,", b"-1:,", b"4:abc"])
def test_netstring_rejects(bad):
    with pytest.raises(FormatError):
        split_netstrings(bad)


def test_netstring_count_enforced():
    with pytest.raises(FormatError):
        split_netstrings(b"1:a,1:b,", required=3)


@given(st.binary(max_size=60))
def test_netstring_parser_never_crashes(data):
    with contextlib.suppress(FormatError):
        split_netstrings(data)
