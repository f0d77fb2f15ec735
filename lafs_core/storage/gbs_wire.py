"""What the GBS client and server agree on byte for byte: headers, ranges, CBOR, request shapes, TLS settings.

Both `gbs_server` and `grid.gbs_client` import this module, so a rule (how a secret header is spelled, what a
Range means, which CBOR is acceptable) lives in one place. The parsing rules copy what Tahoe-LAFS 1.20's server
accepts (werkzeug's header parsers and the CDDL schemas of `storage/http_server.py`); they are strict, because
both ends of every connection may be hostile.

CBOR from the network is scanned before cbor2 decodes it: only the types the protocol uses are allowed (integers,
byte and text strings, arrays, maps, false/true/null and tag 258 around an array, which becomes a set). cbor2 would
otherwise honour dozens of semantic tags (regular expressions, MIME messages, shared references, bignums…) that no
GBS message contains and that an attacker could use to make decoding slow or surprising.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import re
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import cbor2
import h11

from ..errors import FormatError
from ..mutable.slot import TestAndWrite, TestVector, WriteVector

API_PREFIX = "/storage/v1"
CBOR_MIME_TYPE = "application/cbor"
OCTET_STREAM = "application/octet-stream"
AUTHORIZATION_SCHEME = b"Tahoe-LAFS "
VERSION_KEY = b"http://allmydata.org/tahoe/protocols/storage/v1"

# Request body limits of Tahoe 1.20 (`http_server.read_encoded` callers).
ALLOCATE_BODY_LIMIT = 8192
CORRUPT_BODY_LIMIT = 32768
DEFAULT_BODY_LIMIT = 1024 * 1024
LEASE_SECRET_LENGTH = 32
WRITE_ENABLER_LENGTH = 32
MAX_SHARES = 256  # share-numbers and test-write-vectors hold at most this many (Tahoe's CDDL `0*256`)
MAX_VECTORS = 30  # test and read vectors per request (Tahoe's CDDL `0*30`)
MAX_REASON_BYTES = 32765  # `reason: tstr .size (1..32765)`
MAX_UINT = 2**64 - 1

# Limits of the CBOR scanner. No GBS message nests deeper than 6 or needs more map entries than 256 shares.
_MAX_DEPTH = 16
_MAX_MAP_ENTRIES = 1024


class WireError(FormatError):
    """Bytes or a header from the peer that do not follow the protocol."""


class Secret(enum.Enum):
    """The kinds of X-Tahoe-Authorization secrets (`http_common.Secrets`)."""

    LEASE_RENEW = "lease-renew-secret"
    LEASE_CANCEL = "lease-cancel-secret"
    UPLOAD = "upload-secret"
    WRITE_ENABLER = "write-enabler"


_SECRET_BY_NAME = {secret.value: secret for secret in Secret}


# --- headers ---------------------------------------------------------------------------------------------------
def authorization_value(swissnum: bytes) -> bytes:
    """The exact `Authorization` header value: `Tahoe-LAFS <base64 swissnum>`."""
    return AUTHORIZATION_SCHEME + base64.b64encode(swissnum)


def secret_header_value(secret: Secret, value: bytes) -> bytes:
    """One `X-Tahoe-Authorization` header value: `<name> <base64 value>`."""
    return secret.value.encode("ascii") + b" " + base64.b64encode(value)


def parse_secrets(values: Sequence[bytes], required: frozenset[Secret]) -> dict[Secret, bytes]:
    """The secrets of a request's `X-Tahoe-Authorization` headers, which must be exactly the `required` kinds.

    Mirrors Tahoe's `_extract_secrets`: lenient base64 (`b64decode` without validation), an empty secret is an
    error, lease secrets (and, stricter than Tahoe, write enablers) must be 32 bytes, and a repeated kind keeps its
    last value. Raises WireError (the server answers 400); the message never contains a secret.
    """
    result: dict[Secret, bytes] = {}
    for raw in values:
        name, sep, encoded = raw.decode("latin-1").strip().partition(" ")
        secret = _SECRET_BY_NAME.get(name)
        if not sep or secret is None:
            raise WireError("unknown or malformed X-Tahoe-Authorization header")
        try:
            value = base64.b64decode(encoded)
        except (binascii.Error, ValueError):
            raise WireError(f"undecodable {name}") from None
        if not value:
            raise WireError(f"empty {name}")
        if secret in (Secret.LEASE_RENEW, Secret.LEASE_CANCEL) and len(value) != LEASE_SECRET_LENGTH:
            raise WireError("lease secrets must be 32 bytes long")
        # Tahoe would store a shorter write enabler zero-padded and then never match it again: refuse it up front.
        if secret is Secret.WRITE_ENABLER and len(value) != WRITE_ENABLER_LENGTH:
            raise WireError("write enablers must be 32 bytes long")
        result[secret] = value
    if result.keys() != required:
        wanted = sorted(s.value for s in required)
        got = sorted(s.value for s in result)
        raise WireError(f"expected secrets {wanted}, got {got}")
    return result


def media_type(value: bytes | None) -> str | None:
    """The media type of a Content-Type header without parameters, lowercased; None if absent or empty."""
    if value is None:
        return None
    kind = value.decode("latin-1").split(";", 1)[0].strip().lower()
    return kind or None


def accept_prefers_cbor(value: bytes | None) -> bool:
    """Whether a request may get a CBOR answer: no Accept header, or one whose best entry is application/cbor.

    werkzeug's rule as Tahoe uses it: entries sorted by quality, highest first, a bare `*` after the rest; ties
    keep their order; the first entry must be literally `application/cbor` (so `*/*` is refused with 406).
    """
    if value is None:
        return True
    entries: list[tuple[str, float]] = []
    for item in value.decode("latin-1").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if not media:
            continue
        quality, other = 1.0, []
        for param in params:
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(val)
                except ValueError:
                    quality = -1.0
            elif param:
                other.append(param)
        if not 0.0 <= quality <= 1.0:
            continue
        entries.append((media if not other else media + "; " + "; ".join(other), quality))
    entries.sort(key=lambda entry: (entry[0] != "*", entry[1]), reverse=True)
    return bool(entries) and entries[0][0].lower() == CBOR_MIME_TYPE


_PLAIN_INT = re.compile(r"\s*[0-9]{1,20}\s*", re.ASCII)


def _plain_int(text: str) -> int | None:
    return int(text) if _PLAIN_INT.fullmatch(text) else None


def format_range(offset: int, length: int) -> bytes:
    """`Range: bytes=S-E` (inclusive end) for `length` ≥ 1 bytes from `offset`."""
    return b"bytes=%d-%d" % (offset, offset + length - 1)


def parse_range(value: bytes) -> tuple[int, int] | None:
    """A `Range` header as (start, end-exclusive), or None when it is not one closed bytes range (answer 416)."""
    units, sep, spec = value.decode("latin-1").partition("=")
    if not sep or units.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    start, end = _plain_int(first), _plain_int(last)
    if not sep or start is None or end is None or end < start:
        return None
    return start, end + 1


def format_content_range(start: int, end: int) -> bytes:
    """`Content-Range: bytes S-E/*` for bytes [start, end), the form Tahoe's client and server send."""
    return b"bytes %d-%d/*" % (start, end - 1)


def parse_content_range(value: bytes) -> tuple[int, int] | None:
    """A `Content-Range` header as (start, end-exclusive); the total may be `*` or a number and is otherwise
    ignored, as Tahoe ignores it. None when malformed or not in bytes (the server answers 416)."""
    parts = value.decode("latin-1").strip().split(None, 1)
    if len(parts) != 2 or parts[0] != "bytes":
        return None
    span, sep, total_text = parts[1].partition("/")
    total = None if total_text == "*" else _plain_int(total_text)
    first, dash, last = span.partition("-")
    start, stop = _plain_int(first), _plain_int(last)
    if not sep or not dash or start is None or stop is None or (total_text != "*" and total is None):
        return None
    stop += 1
    if start >= stop or (total is not None and start >= total):
        return None
    return start, stop


# --- CBOR ------------------------------------------------------------------------------------------------------
def encode_cbor(obj: Any) -> bytes:
    """CBOR of a message; Python sets become tag 258 (cbor2's default), as the protocol requires."""
    return cbor2.dumps(obj)


def _scan_item(data: memoryview, pos: int, depth: int) -> int:
    """Check one CBOR item starting at `pos` against the allowed subset; return where it ends."""
    if depth > _MAX_DEPTH:
        raise WireError("CBOR nested too deeply")
    if pos >= len(data):
        raise WireError("CBOR ends early")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if major == 7:
        if info in (20, 21, 22):  # false, true, null
            return pos
        raise WireError("CBOR simple value or float not allowed here")
    if info < 24:
        argument = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise WireError("CBOR ends early")
        argument = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    else:
        raise WireError("indefinite-length or reserved CBOR encoding not allowed")
    if major in (0, 1):
        return pos
    if major in (2, 3):
        if argument > len(data) - pos:
            raise WireError("CBOR string longer than the message")
        return pos + argument
    if major == 4:
        if argument > len(data) - pos:
            raise WireError("CBOR array longer than the message")
        for _ in range(argument):
            pos = _scan_item(data, pos, depth + 1)
        return pos
    if major == 5:
        if argument > _MAX_MAP_ENTRIES:
            raise WireError("CBOR map has too many entries")
        if 2 * argument > len(data) - pos:
            raise WireError("CBOR map longer than the message")
        for _ in range(2 * argument):
            pos = _scan_item(data, pos, depth + 1)
        return pos
    # major 6: a tag. Only 258 (a set), and only around an array of at most _MAX_MAP_ENTRIES items.
    if argument != 258:
        raise WireError(f"CBOR tag {argument} not allowed")
    if pos >= len(data) or data[pos] >> 5 != 4:
        raise WireError("CBOR tag 258 must wrap an array")
    end = _scan_item(data, pos, depth + 1)
    if _array_length(data, pos) > _MAX_MAP_ENTRIES:
        raise WireError("CBOR set too large")
    return end


def _array_length(data: memoryview, pos: int) -> int:
    info = data[pos] & 0x1F
    if info < 24:
        return info
    size = 1 << (info - 24)
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "big")


def decode_cbor(data: bytes | bytearray | memoryview) -> Any:
    """Decode one CBOR message from the network; anything outside the protocol's subset raises WireError."""
    view = memoryview(data)
    end = _scan_item(view, 0, 0)
    if end != len(view):
        raise WireError("trailing bytes after the CBOR message")
    try:
        return cbor2.loads(data, allow_indefinite=False, allow_duplicate_keys=False, max_depth=_MAX_DEPTH + 2)
    except Exception as exc:  # any failure to decode scanned hostile bytes is the peer's fault
        raise WireError(f"bad CBOR: {type(exc).__name__}") from None


# --- message shapes --------------------------------------------------------------------------------------------
def is_uint(value: object) -> TypeGuard[int]:
    """A CBOR uint: a non-negative int below 2^64 (bool is not an int here)."""
    return type(value) is int and 0 <= value <= MAX_UINT


def expect_map(value: Any, keys: frozenset[Any], what: str) -> Mapping[Any, Any]:
    """`value` as a map with exactly `keys` (CDDL maps are closed); WireError otherwise."""
    if not isinstance(value, dict) or value.keys() != keys:
        raise WireError(f"{what} must be a map with keys {sorted(map(str, keys))}")
    return value


def expect_uint(value: Any, what: str) -> int:
    if not is_uint(value):
        raise WireError(f"{what} must be an unsigned integer")
    return value


def expect_bytes(value: Any, what: str) -> bytes:
    if type(value) is not bytes:
        raise WireError(f"{what} must be a byte string")
    return value


def expect_list(value: Any, what: str, max_items: int | None = None) -> list[Any]:
    if type(value) is not list or (max_items is not None and len(value) > max_items):
        raise WireError(f"{what} must be an array" + (f" of at most {max_items} items" if max_items else ""))
    return value


def expect_share_set(value: Any, what: str) -> frozenset[int]:
    """A set of share numbers: CBOR tag 258 around at most 256 uints; an untagged array is refused."""
    if not isinstance(value, (set, frozenset)) or len(value) > MAX_SHARES or not all(map(is_uint, value)):
        raise WireError(f"{what} must be a set (CBOR tag 258) of at most {MAX_SHARES} share numbers")
    return frozenset(value)


def allocate_request(share_numbers: set[int], allocated_size: int) -> dict[str, Any]:
    return {"share-numbers": set(share_numbers), "allocated-size": allocated_size}


def parse_allocate_request(obj: Any) -> tuple[frozenset[int], int]:
    """`{share-numbers: #6.258([0*256 uint]), allocated-size: uint}`."""
    body = expect_map(obj, frozenset({"share-numbers", "allocated-size"}), "allocate request")
    return expect_share_set(body["share-numbers"], "share-numbers"), expect_uint(body["allocated-size"], "size")


def parse_corrupt_request(obj: Any) -> str:
    """`{reason: tstr .size (1..32765)}`."""
    reason = expect_map(obj, frozenset({"reason"}), "corruption advisory")["reason"]
    if type(reason) is not str or not 1 <= len(reason.encode("utf-8", "surrogatepass")) <= MAX_REASON_BYTES:
        raise WireError(f"reason must be text of 1 to {MAX_REASON_BYTES} bytes")
    return reason


def read_test_write_request(
    vectors: Mapping[int, TestAndWrite], read_vector: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    return {
        "test-write-vectors": {
            shnum: {
                "test": [{"offset": t.offset, "size": t.size, "specimen": t.specimen} for t in vector.tests],
                "write": [{"offset": w.offset, "data": w.data} for w in vector.writes],
                "new-length": vector.new_length,
            }
            for shnum, vector in vectors.items()
        },
        "read-vector": [{"offset": offset, "size": size} for offset, size in read_vector],
    }


_TWV_KEYS = frozenset({"test", "write", "new-length"})
_TEST_KEYS = frozenset({"offset", "size", "specimen"})
_WRITE_KEYS = frozenset({"offset", "data"})
_READ_KEYS = frozenset({"offset", "size"})


def _test_vector(obj: Any) -> TestVector:
    test = expect_map(obj, _TEST_KEYS, "test vector")
    return TestVector(
        expect_uint(test["offset"], "offset"),
        expect_uint(test["size"], "size"),
        expect_bytes(test["specimen"], "specimen"),
    )


def _write_vector(obj: Any) -> WriteVector:
    write = expect_map(obj, _WRITE_KEYS, "write vector")
    return WriteVector(expect_uint(write["offset"], "offset"), expect_bytes(write["data"], "data"))


def _read_vector(obj: Any) -> tuple[int, int]:
    read = expect_map(obj, _READ_KEYS, "read vector")
    return expect_uint(read["offset"], "offset"), expect_uint(read["size"], "size")


def parse_read_test_write_request(obj: Any) -> tuple[dict[int, TestAndWrite], list[tuple[int, int]]]:
    """Tahoe's `mutable_read_test_write` CDDL schema, checked exactly, in slot.py's vocabulary."""
    body = expect_map(obj, frozenset({"test-write-vectors", "read-vector"}), "read-test-write request")
    twvs = body["test-write-vectors"]
    if not isinstance(twvs, dict) or len(twvs) > MAX_SHARES:
        raise WireError(f"test-write-vectors must be a map of at most {MAX_SHARES} shares")
    vectors = {}
    for shnum, obj_twv in twvs.items():
        twv = expect_map(obj_twv, _TWV_KEYS, "test-write vector")
        new_length = twv["new-length"]
        if new_length is not None:
            expect_uint(new_length, "new-length")
        vectors[expect_uint(shnum, "share number")] = TestAndWrite(
            tuple(map(_test_vector, expect_list(twv["test"], "test", MAX_VECTORS))),
            tuple(map(_write_vector, expect_list(twv["write"], "write"))),
            new_length,
        )
    return vectors, list(map(_read_vector, expect_list(body["read-vector"], "read-vector", MAX_VECTORS)))


# --- HTTP framing ----------------------------------------------------------------------------------------------
_COALESCE = 64 * 1024


def coalesce(connection: h11.Connection, events: Sequence[h11.Event]) -> list[bytes | bytearray | memoryview]:
    """The bytes of h11 events, ready to send: everything small joined into as few pieces as possible (each
    send is a TLS record and a system call), large data passed through as is (no copy of share data)."""
    pieces: list[bytes | bytearray | memoryview] = []
    small = bytearray()
    for event in events:
        if isinstance(event, h11.Data) and len(event.data) >= _COALESCE:
            for piece in connection.send_with_data_passthrough(event) or ():
                if len(piece) < _COALESCE:
                    small += piece
                    continue
                if small:
                    pieces.append(small)
                    small = bytearray()
                pieces.append(piece)
        else:
            small += connection.send(event) or b""
    if small:
        pieces.append(small)
    return pieces


# --- TLS -------------------------------------------------------------------------------------------------------
def server_ssl_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+ server context presenting a (self-signed) certificate; no client certificates are asked for.

    The ssl module loads keys only from files, so the PEMs pass through a private temporary directory that is
    removed at once.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0  # clients open few, long-lived connections: session tickets only cost a round of work
    with tempfile.TemporaryDirectory(prefix="blackmatch-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context


def client_ssl_context() -> ssl.SSLContext:
    """TLS 1.2+ client context that accepts any certificate: identity is checked afterwards by the SPKI pin
    (Tahoe servers use self-signed, possibly expired certificates)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
