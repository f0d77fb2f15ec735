"""The read cache's on-disk format, sans-IO: names, meta-file headers and segment slots as bytes in, bytes out.

Kept apart from the code that opens files so the format can be read, tested and kept compatible on its own: a
cache directory written by one version must read the same in the next (or fail its checks and be refetched,
never served). Layout of one entry (see `grid_server.read_cache` for why):

    <SI>-<tag>.data   the file's plaintext at its natural offsets, sparse: only present segments are allocated
    <SI>-<tag>.meta   a 128-byte header (which file this is, its segment size), then one 48-byte slot per
                      segment: the SHA-256 of the segment's plaintext and a check binding it to the header

`<SI>` is the storage index in base32 and `<tag>` a hash of the rest of the file's identity (UEB hash, k, N,
size), so two caps sharing a storage index never share an entry. The read key never appears in a name.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

from lafs_core import base32
from lafs_core.caps import ChkCap

MAGIC = b"BMRCACH1"
_HEADER = struct.Struct(">8s16s32sHHQQ")
_HEADER_DOMAIN = b"blackmatch read-cache header:"
_NAME_DOMAIN = b"blackmatch read-cache entry v1:"
HEADER_SIZE = 128
DIGEST_SIZE = 32
CHECK_SIZE = 16
SLOT_SIZE = DIGEST_SIZE + CHECK_SIZE
EMPTY_SLOT = bytes(SLOT_SIZE)
"""What a slot holds when its segment is absent (also what a sparse meta file reads as past its end)."""


@dataclass(frozen=True)
class Identity:
    """What pins a CHK file's content: the same identity always means the same plaintext."""

    storage_index: bytes
    ueb_hash: bytes
    needed: int
    total: int
    size: int

    @classmethod
    def of(cls, cap: ChkCap) -> Identity:
        return _identity_of(cap)

    @property
    def name(self) -> str:
        """The entry's file name stem, `<storage index>-<tag>`."""
        return _entry_name(self)


@functools.lru_cache(maxsize=1024)
def _identity_of(cap: ChkCap) -> Identity:
    """Cached: deriving the storage index from the key is a hash, and every read needs it."""
    return Identity(cap.storage_index, cap.ueb_hash, cap.needed, cap.total, cap.size)


@functools.lru_cache(maxsize=1024)
def _entry_name(identity: Identity) -> str:
    """`<storage index>-<tag>`: the tag (a hash of the rest of the identity) keeps caps sharing an SI apart."""
    packed = struct.pack(
        ">16s32sHHQ", identity.storage_index, identity.ueb_hash, identity.needed, identity.total, identity.size
    )
    tag = hashlib.sha256(_NAME_DOMAIN + packed).digest()[:10]
    return f"{base32.encode(identity.storage_index)}-{base32.encode(tag)}"


def _header_check(body: bytes) -> bytes:
    return hashlib.sha256(_HEADER_DOMAIN + body).digest()[:CHECK_SIZE]


def pack_header(identity: Identity, segment_size: int) -> tuple[bytes, bytes]:
    """The meta file's header and its check value (which every slot is bound to)."""
    body = _HEADER.pack(
        MAGIC,
        identity.storage_index,
        identity.ueb_hash,
        identity.needed,
        identity.total,
        identity.size,
        segment_size,
    )
    check = _header_check(body)
    return (body + check).ljust(HEADER_SIZE, b"\0"), check


@functools.lru_cache(maxsize=1024)
def header_check(identity: Identity, segment_size: int) -> bytes:
    """The check value slots of this entry are bound to: a function of the header, so never stored apart."""
    return pack_header(identity, segment_size)[1]


def parse_header(raw: bytes) -> tuple[Identity, int] | None:
    """(identity, segment size) from a meta file's first bytes, or None if they are not a good header."""
    if len(raw) < HEADER_SIZE:
        return None
    body, check = raw[: _HEADER.size], raw[_HEADER.size : _HEADER.size + CHECK_SIZE]
    if _header_check(body) != check:
        return None
    magic, si, ueb_hash, needed, total, size, segment_size = _HEADER.unpack(body)
    if magic != MAGIC or not (1 <= needed <= total <= 256) or size < 1 or segment_size < 1:
        return None
    return Identity(si, ueb_hash, needed, total, size), segment_size


def segment_digest(data: bytes) -> bytes:
    """What a slot records of a segment's plaintext."""
    return hashlib.sha256(data).digest()


def pack_slot(header_check: bytes, segnum: int, digest: bytes) -> bytes:
    """A slot saying segment `segnum` is present with this digest; the check binds it to its entry and place."""
    check = hashlib.sha256(header_check + segnum.to_bytes(8, "big") + digest).digest()[:CHECK_SIZE]
    return digest + check


def parse_slot(header_check: bytes, segnum: int, raw: bytes) -> bytes | None:
    """The segment digest a slot records, or None for an empty, torn or foreign slot."""
    if len(raw) != SLOT_SIZE or raw == EMPTY_SLOT:
        return None
    digest = raw[:DIGEST_SIZE]
    return digest if pack_slot(header_check, segnum, digest) == raw else None


def slot_offset(segnum: int) -> int:
    """Where segment `segnum`'s slot sits in the meta file."""
    return HEADER_SIZE + SLOT_SIZE * segnum


def segment_count(segment_size: int, size: int) -> int:
    return -(-size // segment_size)


def segment_span(segment_size: int, size: int, segnum: int) -> tuple[int, int]:
    """[start, stop) of a segment in the file (and so in the data file): the last one may be short."""
    start = segnum * segment_size
    return start, min(start + segment_size, size)


@dataclass(frozen=True)
class ParsedEntry:
    """A cache entry as its meta file describes it: which segments are present, with their digests."""

    identity: Identity
    segment_size: int
    records: dict[int, bytes]


def parse_entry(stem: str, meta: bytes, data_size: int) -> ParsedEntry | None:
    """The entry stored as `<stem>.meta` (these bytes) next to a data file of `data_size` bytes.

    None if the entry is unusable as a whole: a bad header, a header naming another file than `stem`, or no
    good slot. Slots that are empty, torn, foreign or describe data past the data file's end are left out,
    so those segments read as absent and are fetched again.
    """
    parsed = parse_header(meta)
    if parsed is None:
        return None
    identity, segment_size = parsed
    if identity.name != stem:
        return None
    check = header_check(identity, segment_size)
    records: dict[int, bytes] = {}
    slots = min(segment_count(segment_size, identity.size), max(0, (len(meta) - HEADER_SIZE) // SLOT_SIZE))
    for segnum in range(slots):
        digest = parse_slot(check, segnum, meta[slot_offset(segnum) : slot_offset(segnum) + SLOT_SIZE])
        if digest is not None and segment_span(segment_size, identity.size, segnum)[1] <= data_size:
            records[segnum] = digest
    if not records:
        return None
    return ParsedEntry(identity, segment_size, records)
