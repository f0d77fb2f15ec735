"""The RPC frame format: round trips however the stream is cut, and hostile bytes give ProtocolError, never more."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grid_server.rpc_wire import (
    MAX_BODY,
    VERSION,
    Frame,
    FrameReader,
    ProtocolError,
    check_hello,
    encode_frame,
    error,
    hello,
    parse_request,
    request,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
messages = st.dictionaries(st.text(), json_values, max_size=5)


def feed_in_pieces(reader: FrameReader, stream: bytes, cuts: list[int]) -> list[Frame]:
    frames = []
    start = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        frames += reader.feed(stream[start:cut])
        start = max(start, cut)
    return frames


@given(st.lists(st.tuples(messages, st.binary(max_size=300)), max_size=5), st.lists(st.integers(0, 10**6)))
def test_frames_survive_any_cutting_of_the_stream(sent, cuts):
    stream = b"".join(encode_frame(message, data) for message, data in sent)
    reader = FrameReader()
    assert feed_in_pieces(reader, stream, cuts) == [Frame(message, data) for message, data in sent]
    assert reader.pending == 0


@given(st.binary(max_size=200))
def test_garbage_gives_protocol_error_or_waits_for_more(garbage):
    reader = FrameReader()
    try:
        frames = reader.feed(garbage)
    except ProtocolError:
        return
    for frame in frames:
        assert isinstance(frame.message, dict)


def test_a_2_gib_length_prefix_is_refused_before_anything_is_buffered():
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="limit"):
        reader.feed(struct.pack(">II", 2**31, 10))


def test_malformed_frames():
    with pytest.raises(ProtocolError, match="longer than the frame"):
        FrameReader().feed(struct.pack(">II", 4, 5) + b"{}{}")
    with pytest.raises(ProtocolError, match="not JSON"):
        FrameReader().feed(struct.pack(">II", 3, 3) + b"{x}")
    with pytest.raises(ProtocolError, match="not an object"):
        FrameReader().feed(struct.pack(">II", 2, 2) + b"[]")
    with pytest.raises(ValueError):
        encode_frame({}, bytes(MAX_BODY))


def test_a_peer_that_vanishes_mid_frame_leaves_bytes_pending():
    reader = FrameReader()
    frame = encode_frame(request(1, "read", {"fh": 3}), b"x" * 100)
    assert reader.feed(frame[:-1]) == []
    assert reader.pending == len(frame) - 1


def test_handshake_refuses_other_protocols_and_versions():
    check_hello(hello())
    with pytest.raises(ProtocolError, match="does not speak"):
        check_hello({"hello": "http"})
    with pytest.raises(ProtocolError, match=f"this side speaks {VERSION}, the other 99"):
        check_hello({"hello": "blackmatch-rpc", "version": 99})


def test_requests_are_parsed_or_refused():
    parsed = parse_request(request(7, "lookup", {"parent": 1, "name": "a"}))
    assert (parsed.id, parsed.method, parsed.params) == (7, "lookup", {"parent": 1, "name": "a"})
    for bad in [
        {},
        {"id": "7", "method": "x"},
        {"id": True, "method": "x"},
        {"id": 1},
        {"id": 1, "method": 3},
        {"id": 1, "method": "x", "params": [1]},
    ]:
        with pytest.raises(ProtocolError):
            parse_request(bad)
    assert error(7, 2, "no such file") == {"id": 7, "error": {"errno": 2, "message": "no such file"}}
