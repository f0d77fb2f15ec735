"""Byte layout of a CHK share (`immutable/layout.py`) and of the URI extension block (`uri.py`).

A share is: header (v1 `>9L`, or v2 `>L8Q` when anything reaches 2^32), blocks, an unused zero-filled
plaintext-tree region, the crypttext hash tree, this share's block hash tree, its share hash chain, and the
length-prefixed UEB. Every offset follows from the encoding parameters, so a reader can check a share's header
against the parameters the cap vouches for instead of trusting it.
"""

import re
import struct
from dataclasses import dataclass

from ..errors import FormatError
from ..hashes import HASH_SIZE
from ..hashtree import tree_size
from ..netstring import netstring, read_netstring
from .params import ChkParameters

HEADER_READ_SIZE = 0x44
"""Enough bytes to parse either header version."""

MAX_UEB_SIZE = 2000
"""Readers reject a UEB of this length or more (real ones are about 420 bytes)."""

SHARE_HASH_ENTRY = struct.Struct(">H32s")

_V1 = struct.Struct(">LLLLLLLLL")
_V2 = struct.Struct(">LQQQQQQQQ")


@dataclass(frozen=True)
class ShareOffsets:
    """The offsets table of a share header, plus the two informational size fields."""

    version: int
    block_size: int
    data_size: int
    data: int
    plaintext_hash_tree: int
    crypttext_hash_tree: int
    block_hashes: int
    share_hashes: int
    uri_extension: int

    @property
    def fieldsize(self) -> int:
        """Width of the UEB length field: 4 bytes in v1 shares, 8 in v2."""
        return 4 if self.version == 1 else 8

    def pack(self) -> bytes:
        fmt = _V1 if self.version == 1 else _V2
        return fmt.pack(
            self.version,
            self.block_size,
            self.data_size,
            self.data,
            self.plaintext_hash_tree,
            self.crypttext_hash_tree,
            self.block_hashes,
            self.share_hashes,
            self.uri_extension,
        )

    def share_size(self, ueb_length: int) -> int:
        """Total share size: the exact number of bytes to allocate on a server."""
        return self.uri_extension + self.fieldsize + ueb_length


def num_share_hashes(total: int) -> int:
    """Entries in each share's hash chain: one per level of the share tree, leaf included."""
    return (tree_size(total) + 1).bit_length() - 1


def expected_offsets(params: ChkParameters, version: int | None = None) -> ShareOffsets:
    """Offsets a writer uses for these parameters; v1 unless something needs 64 bits (or `version` says)."""
    tree_bytes = tree_size(params.num_segments) * HASH_SIZE
    chain_bytes = num_share_hashes(params.total) * SHARE_HASH_ENTRY.size

    def build(ver: int) -> ShareOffsets:
        data = _V1.size if ver == 1 else _V2.size
        plaintext = data + params.share_data_size
        crypttext = plaintext + tree_bytes
        block_hashes = crypttext + tree_bytes
        share_hashes = block_hashes + tree_bytes
        uri_extension = share_hashes + chain_bytes
        return ShareOffsets(
            ver,
            params.block_size,
            params.share_data_size,
            data,
            plaintext,
            crypttext,
            block_hashes,
            share_hashes,
            uri_extension,
        )

    if version is not None:
        return build(version)
    v1 = build(1)
    fits = v1.block_size < 2**32 and v1.data_size < 2**32 and v1.uri_extension < 2**32
    return v1 if fits else build(2)


def parse_header(data: bytes) -> ShareOffsets:
    """Parse a share header (at least the first 0x24 bytes for v1, 0x44 for v2)."""
    if len(data) < 4:
        raise FormatError("share is shorter than its version field")
    (version,) = struct.unpack(">L", data[:4])
    fmt = {1: _V1, 2: _V2}.get(version)
    if fmt is None:
        raise FormatError(f"unknown immutable share version {version}")
    if len(data) < fmt.size:
        raise FormatError(f"share header truncated ({len(data)} bytes)")
    fields = fmt.unpack(data[: fmt.size])
    offsets = ShareOffsets(*fields)
    ordered = [
        fmt.size,
        offsets.data,
        offsets.plaintext_hash_tree,
        offsets.crypttext_hash_tree,
        offsets.block_hashes,
        offsets.share_hashes,
        offsets.uri_extension,
    ]
    if offsets.data != fmt.size or ordered != sorted(ordered):
        raise FormatError("share header offsets are out of order")
    return offsets


def pack_share_hash_chain(entries: list[tuple[int, bytes]]) -> bytes:
    return b"".join(SHARE_HASH_ENTRY.pack(index, value) for index, value in entries)


def parse_share_hash_chain(data: bytes) -> dict[int, bytes]:
    if len(data) % SHARE_HASH_ENTRY.size:
        raise FormatError(f"share hash chain of {len(data)} bytes is not a whole number of entries")
    chain: dict[int, bytes] = {}
    for index, value in SHARE_HASH_ENTRY.iter_unpack(data):
        if chain.setdefault(index, value) != value:
            raise FormatError(f"share hash chain gives node {index} twice")
    return chain


# --- URI extension block ---------------------------------------------------------------------------------------
_UEB_KEY = re.compile(rb"[a-zA-Z_\-]+")
_UEB_INT_KEYS = ("needed_shares", "total_shares", "num_segments", "segment_size", "size")
_UEB_HASH_KEYS = ("crypttext_hash", "crypttext_root_hash", "share_root_hash")


@dataclass(frozen=True)
class UriExtension:
    """The fields of a UEB that a reader uses. Its hash is in the cap, so once checked it is trusted."""

    codec_name: bytes
    codec_params: bytes
    tail_codec_params: bytes
    needed_shares: int
    total_shares: int
    num_segments: int
    segment_size: int
    size: int
    crypttext_hash: bytes
    crypttext_root_hash: bytes
    share_root_hash: bytes

    def pack(self) -> bytes:
        """Serialize: sorted keys, each as `key:` + netstring(value), integers in decimal."""
        items: dict[str, bytes] = {}
        for name, value in self.__dict__.items():
            items[name] = b"%d" % value if isinstance(value, int) else value
        return b"".join(key.encode() + b":" + netstring(items[key]) for key in sorted(items))

    def params(self) -> ChkParameters:
        return ChkParameters(self.needed_shares, self.total_shares, self.segment_size, self.size)


def parse_uri_extension(data: bytes) -> UriExtension:
    """Parse a UEB; unknown keys are ignored, missing or malformed required ones raise FormatError."""
    if len(data) >= MAX_UEB_SIZE:
        raise FormatError(f"URI extension block of {len(data)} bytes is too large")
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        colon = data.find(b":", pos)
        if colon < 0 or not _UEB_KEY.fullmatch(data[pos:colon]):
            raise FormatError("malformed URI extension block key")
        key = data[pos:colon].decode("ascii")
        value, pos = read_netstring(data, colon + 1)
        if key in fields:
            raise FormatError(f"URI extension block repeats key {key}")
        fields[key] = value
    try:
        values: dict[str, object] = {
            "codec_name": fields["codec_name"],
            "codec_params": fields["codec_params"],
            "tail_codec_params": fields["tail_codec_params"],
        }
        for key in _UEB_INT_KEYS:
            raw = fields[key]
            if not raw.isdigit():
                raise FormatError(f"URI extension block {key} is not a number")
            values[key] = int(raw)
        for key in _UEB_HASH_KEYS:
            if len(fields[key]) != HASH_SIZE:
                raise FormatError(f"URI extension block {key} is not a {HASH_SIZE}-byte hash")
            values[key] = fields[key]
    except KeyError as missing:
        raise FormatError(f"URI extension block lacks {missing.args[0]}") from None
    return UriExtension(**values)  # type: ignore[arg-type]


def ueb_for(
    params: ChkParameters, crypttext_hash: bytes, crypttext_root_hash: bytes, share_root_hash: bytes
) -> UriExtension:
    """The UEB a writer produces for these parameters and hashes."""
    return UriExtension(
        codec_name=b"crs",
        codec_params=params.codec_params(),
        tail_codec_params=params.tail_codec_params(),
        needed_shares=params.needed,
        total_shares=params.total,
        num_segments=params.num_segments,
        segment_size=params.segment_size,
        size=params.size,
        crypttext_hash=crypttext_hash,
        crypttext_root_hash=crypttext_root_hash,
        share_root_hash=share_root_hash,
    )
