"""The RPC wire format between fuse_client and grid_server over the node directory's Unix socket (sans-IO).

A connection is a stream of frames in both directions. One frame:

    u32 big-endian  body length B (what follows, at most MAX_BODY)
    u32 big-endian  JSON length J (J <= B)
    J bytes         one JSON object, orjson-encoded (UTF-8)
    B - J bytes     the frame's binary attachment: file data, never base64 in the JSON

The first frame each way is the handshake: the client sends {"hello": "blackmatch-rpc", "version": V}, the server
answers with the same shape and its own version; either side refuses a different version with an error message
and closes. Then the client sends requests and the server answers them, in any order:

    request   {"id": N, "method": "read", "params": {...}}            (+ attachment: a write's data)
    result    {"id": N, "result": ...}                                 (+ attachment: a read's data)
    error     {"id": N, "error": {"errno": E, "message": "..."}}

Ids are the client's, unique among its requests in flight, so many requests share one connection and a slow one
(a download) never holds up the others. A frame that breaks these rules is a ProtocolError: the reader answers it
(when it has an id) or closes the connection, and goes on serving its other connections.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

PROTOCOL = "blackmatch-rpc"
VERSION = 2
MAX_BODY = 64 * 1024 * 1024 + 64 * 1024  # the largest read or write the shim asks for, plus its JSON
_HEADER = struct.Struct(">II")


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol; the connection cannot go on."""


@dataclass(frozen=True)
class Frame:
    message: dict[str, Any]
    data: bytes = b""


def encode_frame(message: dict[str, Any], data: bytes = b"") -> bytes:
    body = orjson.dumps(message)
    if len(body) + len(data) > MAX_BODY:
        raise ValueError(f"frame of {len(body) + len(data)} bytes exceeds the limit of {MAX_BODY}")
    return _HEADER.pack(len(body) + len(data), len(body)) + body + data


class FrameReader:
    """Bytes in, frames out: feed whatever the socket gave, take the frames that are complete."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by `data`, in order; raises ProtocolError on a malformed one (the rest is lost).

        File data is copied once, into its Frame: whole frames are cut straight out of `data` when nothing is
        buffered, and only an incomplete tail waits in the buffer."""
        buffered = bool(self._buffer)
        if buffered:
            self._buffer += data
        view = memoryview(self._buffer if buffered else data)
        frames = []
        start = 0
        try:
            while len(view) - start >= _HEADER.size:
                body_length, json_length = _HEADER.unpack_from(view, start)
                if body_length > MAX_BODY:
                    raise ProtocolError(f"frame of {body_length} bytes announced; the limit is {MAX_BODY}")
                if json_length > body_length:
                    raise ProtocolError("frame's JSON part is longer than the frame")
                end = start + _HEADER.size + body_length
                if len(view) < end:
                    break
                json_end = start + _HEADER.size + json_length
                try:
                    message = orjson.loads(view[start + _HEADER.size : json_end])
                except orjson.JSONDecodeError as exc:
                    raise ProtocolError(f"frame is not JSON: {exc}") from None
                if not isinstance(message, dict):
                    raise ProtocolError("frame's JSON is not an object")
                frames.append(Frame(message, bytes(view[json_end:end])))
                start = end
        finally:
            view.release()
        if buffered:
            del self._buffer[:start]
        elif start < len(data):
            self._buffer = bytearray(memoryview(data)[start:])
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame (a peer that leaves here vanished mid-frame)."""
        return len(self._buffer)


# --- message shapes ------------------------------------------------------------------------------------------
def hello() -> dict[str, Any]:
    return {"hello": PROTOCOL, "version": VERSION}


def check_hello(message: dict[str, Any]) -> None:
    """Raise ProtocolError unless `message` is a handshake of this protocol's version."""
    if message.get("hello") != PROTOCOL:
        raise ProtocolError("the peer does not speak blackmatch's RPC protocol")
    if message.get("version") != VERSION:
        raise ProtocolError(
            f"protocol version mismatch: this side speaks {VERSION}, the other {message.get('version')!r}; "
            "run the same blackmatch version on both sides (unmount, then mount again)"
        )


def check_server_hello(message: dict[str, Any]) -> None:
    """The client's check of the server's answer to its hello: a refusal (the server's hello with an error, such
    as a version mismatch seen from its side) or a handshake of another version is a ProtocolError."""
    if "error" in message:
        refusal = message["error"]
        raise ProtocolError(refusal.get("message", "refused") if isinstance(refusal, dict) else "refused")
    check_hello(message)


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: dict[str, Any]


def request(id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "method": method, "params": params}


def parse_request(message: dict[str, Any]) -> Request:
    """The request in `message`; ProtocolError if it is not one (without an id it cannot even be answered)."""
    id = message.get("id")
    if not isinstance(id, int) or isinstance(id, bool):
        raise ProtocolError("request without an integer id")
    method, params = message.get("method"), message.get("params", {})
    if not isinstance(method, str) or not isinstance(params, dict):
        raise ProtocolError("request needs a method name and an object of parameters")
    return Request(id, method, params)


def result(id: int, value: Any) -> dict[str, Any]:
    return {"id": id, "result": value}


def error(id: int, errno: int, message: str) -> dict[str, Any]:
    return {"id": id, "error": {"errno": errno, "message": message}}
