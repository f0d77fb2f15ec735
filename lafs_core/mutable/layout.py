"""Byte layout of SDMF (version 0) and MDMF (version 1) mutable shares (`mutable/layout.py`).

SDMF: a 107-byte header (signed prefix `>BQ32s16sBBQQ` then offsets `>LLLLQQ`), then verification key,
signature, share hash chain, block hash tree, the one block, encrypted private key. Signed bytes are
`share[0:75]`; the checkstring that writers test is `share[0:57]`.

MDMF: a 123-byte header (signed prefix `>BQ32sBBQQ` then eight `>Q` offsets), then encrypted private key,
share hash chain, signature and verification key packed tightly from 123, a gap up to the constant share-data
offset 2167, `salt16 + block` per segment, and the block hash tree. Signed bytes are `share[0:59]`; the
checkstring is `share[0:41]`.

Readers use the offsets table, so whatever a longer earlier version left after the end is ignored.
"""

import struct
from dataclasses import dataclass

from ..errors import FormatError
from ..hashes import HASH_SIZE, SALT_SIZE
from ..hashtree import tree_size
from ..immutable.layout import SHARE_HASH_ENTRY

SDMF_VERSION = 0
MDMF_VERSION = 1

SDMF_PREFIX = struct.Struct(">BQ32s16sBBQQ")  # 75 bytes, signed
SDMF_OFFSETS = struct.Struct(">LLLLQQ")
SDMF_HEADER_SIZE = SDMF_PREFIX.size + SDMF_OFFSETS.size  # 107
SDMF_CHECKSTRING_SIZE = struct.calcsize(">BQ32s16s")  # 57

MDMF_PREFIX = struct.Struct(">BQ32sBBQQ")  # 59 bytes, signed
MDMF_OFFSETS = struct.Struct(">QQQQQQQQ")
MDMF_HEADER_SIZE = MDMF_PREFIX.size + MDMF_OFFSETS.size  # 123
MDMF_CHECKSTRING_SIZE = struct.calcsize(">BQ32s")  # 41

# Space MDMF reserves before the share data, so the variable-length fields fit whatever their exact size.
PRIVATE_KEY_SIZE = 1220
SIGNATURE_SIZE = 260
VERIFICATION_KEY_SIZE = 292
SHARE_HASH_CHAIN_SIZE = SHARE_HASH_ENTRY.size * 8
MDMF_SHARE_DATA_OFFSET = (
    MDMF_HEADER_SIZE + PRIVATE_KEY_SIZE + SIGNATURE_SIZE + VERIFICATION_KEY_SIZE + SHARE_HASH_CHAIN_SIZE
)  # 2167

MDMF_SEGMENT_SIZE = 128 * 1024
"""MDMF's maximum segment size (rounded up to a multiple of k); independent of the file's size."""


def next_multiple(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass(frozen=True)
class SignedPrefix:
    """The signed start of a share: it names one version of the file."""

    version: int
    seqnum: int
    root_hash: bytes
    salt: bytes | None  # the SDMF IV; MDMF keeps a salt per segment instead
    needed: int
    total: int
    segment_size: int
    data_length: int

    def pack(self) -> bytes:
        if self.version == SDMF_VERSION:
            assert self.salt is not None
            return SDMF_PREFIX.pack(
                0, self.seqnum, self.root_hash, self.salt, self.needed, self.total, self.segment_size, self.data_length
            )
        return MDMF_PREFIX.pack(
            1, self.seqnum, self.root_hash, self.needed, self.total, self.segment_size, self.data_length
        )

    def checkstring(self) -> bytes:
        """What a writer tests before overwriting this version: version, seqnum, root hash (and SDMF salt)."""
        size = SDMF_CHECKSTRING_SIZE if self.version == SDMF_VERSION else MDMF_CHECKSTRING_SIZE
        return self.pack()[:size]

    @property
    def num_segments(self) -> int:
        return -(-self.data_length // self.segment_size) if self.segment_size else 0

    @property
    def block_size(self) -> int:
        return self.segment_size // self.needed

    @property
    def tail_segment_size(self) -> int:
        """Plaintext bytes of the last segment (0 for an empty file)."""
        if not self.data_length:
            return 0
        return self.data_length % self.segment_size or self.segment_size

    @property
    def tail_block_size(self) -> int:
        return next_multiple(self.tail_segment_size, self.needed) // self.needed

    def segment_span(self, segnum: int) -> tuple[int, int]:
        start = segnum * self.segment_size
        return start, min(start + self.segment_size, self.data_length)

    def block_length(self, segnum: int) -> int:
        return self.tail_block_size if segnum == self.num_segments - 1 else self.block_size

    def share_data_size(self) -> int:
        """Bytes of share data: the blocks, each MDMF block preceded by its salt."""
        if not self.num_segments:
            return 0
        stride = self.block_size + (SALT_SIZE if self.version == MDMF_VERSION else 0)
        last = self.tail_block_size + (SALT_SIZE if self.version == MDMF_VERSION else 0)
        return stride * (self.num_segments - 1) + last

    def validate(self) -> None:
        """Refuse parameters no writer produces (they would make a reader misbehave)."""
        if not 1 <= self.needed <= self.total <= 255:
            raise FormatError(f"mutable share has impossible k={self.needed} N={self.total}")
        if self.segment_size % self.needed:
            raise FormatError("mutable share segment size is not a multiple of k")
        if self.data_length and not self.segment_size:
            raise FormatError("mutable share has data but a zero segment size")
        if self.version == SDMF_VERSION and self.num_segments > 1:
            raise FormatError("SDMF share with more than one segment")


def parse_prefix(data: bytes) -> SignedPrefix:
    if not data:
        raise FormatError("empty mutable share")
    if data[0] == SDMF_VERSION:
        if len(data) < SDMF_PREFIX.size:
            raise FormatError("SDMF share shorter than its prefix")
        _v, seqnum, root, salt, k, n, segsize, datalen = SDMF_PREFIX.unpack(data[: SDMF_PREFIX.size])
        prefix = SignedPrefix(SDMF_VERSION, seqnum, root, salt, k, n, segsize, datalen)
    elif data[0] == MDMF_VERSION:
        if len(data) < MDMF_PREFIX.size:
            raise FormatError("MDMF share shorter than its prefix")
        _v, seqnum, root, k, n, segsize, datalen = MDMF_PREFIX.unpack(data[: MDMF_PREFIX.size])
        prefix = SignedPrefix(MDMF_VERSION, seqnum, root, None, k, n, segsize, datalen)
    else:
        raise FormatError(f"unknown mutable share version {data[0]}")
    prefix.validate()
    return prefix


@dataclass(frozen=True)
class MutableOffsets:
    """Where each region of a share starts; the same names serve both versions."""

    enc_privkey: int
    share_hash_chain: int
    signature: int
    verification_key: int
    verification_key_end: int
    share_data: int
    block_hash_tree: int
    eof: int

    def pack(self, version: int) -> bytes:
        if version == SDMF_VERSION:
            return SDMF_OFFSETS.pack(
                self.signature, self.share_hash_chain, self.block_hash_tree, self.share_data, self.enc_privkey, self.eof
            )
        return MDMF_OFFSETS.pack(
            self.enc_privkey,
            self.share_hash_chain,
            self.signature,
            self.verification_key,
            self.verification_key_end,
            self.share_data,
            self.block_hash_tree,
            self.eof,
        )


def parse_offsets(prefix: SignedPrefix, data: bytes) -> MutableOffsets:
    """Parse and sanity-check the offsets table that follows the signed prefix."""
    if prefix.version == SDMF_VERSION:
        if len(data) < SDMF_HEADER_SIZE:
            raise FormatError("SDMF share shorter than its header")
        sig, chain, tree, share_data, privkey, eof = SDMF_OFFSETS.unpack(data[SDMF_PREFIX.size : SDMF_HEADER_SIZE])
        offsets = MutableOffsets(privkey, chain, sig, SDMF_HEADER_SIZE, sig, share_data, tree, eof)
        order = [SDMF_HEADER_SIZE, sig, chain, tree, share_data, privkey, eof]
    else:
        if len(data) < MDMF_HEADER_SIZE:
            raise FormatError("MDMF share shorter than its header")
        offsets = MutableOffsets(*MDMF_OFFSETS.unpack(data[MDMF_PREFIX.size : MDMF_HEADER_SIZE]))
        o = offsets
        order = [
            MDMF_HEADER_SIZE,
            o.enc_privkey,
            o.share_hash_chain,
            o.signature,
            o.verification_key,
            o.verification_key_end,
            o.share_data,
            o.block_hash_tree,
            o.eof,
        ]
    if order != sorted(order):
        raise FormatError("mutable share offsets are out of order")
    expected_tree = tree_size(prefix.num_segments) * HASH_SIZE
    tree_bytes = (
        offsets.eof - offsets.block_hash_tree
        if prefix.version == MDMF_VERSION
        else offsets.share_data - offsets.block_hash_tree
    )
    data_bytes = (
        offsets.block_hash_tree - offsets.share_data
        if prefix.version == MDMF_VERSION
        else offsets.enc_privkey - offsets.share_data
    )
    if tree_bytes != expected_tree or data_bytes != prefix.share_data_size():
        raise FormatError("mutable share regions do not match its encoding parameters")
    return offsets


def header_read_size(offsets: MutableOffsets, version: int) -> int:
    """How many bytes from 0 hold the prefix, keys, signature and hash chain."""
    if version == SDMF_VERSION:
        return offsets.block_hash_tree
    return offsets.verification_key_end


@dataclass(frozen=True)
class ShareHeader:
    """The self-describing start of a share: what the servermap needs to judge it."""

    prefix: SignedPrefix
    signed_bytes: bytes
    offsets: MutableOffsets
    verification_key: bytes
    signature: bytes
    share_hash_chain: dict[int, bytes]
    enc_privkey: bytes | None  # present when the read covered it (always for MDMF)


class NeedMoreData(FormatError):
    """The share's header continues past the bytes read; read `length` bytes from the start."""

    def __init__(self, length: int) -> None:
        super().__init__(f"need the first {length} bytes of the share")
        self.length = length


def parse_share_header(data: bytes) -> ShareHeader:
    """Parse a share's header regions from its first bytes; NeedMoreData says how many are needed."""
    if len(data) < MDMF_HEADER_SIZE and not (data[:1] == bytes([SDMF_VERSION]) and len(data) >= SDMF_HEADER_SIZE):
        raise NeedMoreData(MDMF_HEADER_SIZE)
    prefix = parse_prefix(data)
    offsets = parse_offsets(prefix, data)
    need = header_read_size(offsets, prefix.version)
    if len(data) < need:
        raise NeedMoreData(need)
    chain_end = offsets.block_hash_tree if prefix.version == SDMF_VERSION else offsets.signature
    chain_bytes = data[offsets.share_hash_chain : chain_end]
    if len(chain_bytes) % SHARE_HASH_ENTRY.size:
        raise FormatError("mutable share hash chain is not a whole number of entries")
    chain = {index: value for index, value in SHARE_HASH_ENTRY.iter_unpack(chain_bytes)}
    if prefix.version == SDMF_VERSION:
        enc_privkey = data[offsets.enc_privkey : offsets.eof] if len(data) >= offsets.eof else None
        signature = data[offsets.signature : offsets.share_hash_chain]
    else:
        enc_privkey = data[offsets.enc_privkey : offsets.share_hash_chain]
        signature = data[offsets.signature : offsets.verification_key]
    size = SDMF_PREFIX.size if prefix.version == SDMF_VERSION else MDMF_PREFIX.size
    return ShareHeader(
        prefix=prefix,
        signed_bytes=data[:size],
        offsets=offsets,
        verification_key=data[offsets.verification_key : offsets.verification_key_end],
        signature=signature,
        share_hash_chain=chain,
        enc_privkey=enc_privkey,
    )


def block_offset(prefix: SignedPrefix, offsets: MutableOffsets, segnum: int) -> int:
    """Where segment `segnum`'s block (after its salt, for MDMF) starts in a share."""
    if prefix.version == SDMF_VERSION:
        return offsets.share_data
    return offsets.share_data + segnum * (prefix.block_size + SALT_SIZE) + SALT_SIZE


def pack_share_hash_chain(chain: dict[int, bytes]) -> bytes:
    """Mutable shares store their chain sorted by node index (unlike CHK shares)."""
    return b"".join(SHARE_HASH_ENTRY.pack(index, chain[index]) for index in sorted(chain))


def pack_sdmf_share(
    prefix: SignedPrefix,
    verification_key: bytes,
    signature: bytes,
    share_hash_chain: dict[int, bytes],
    block_hash_tree: list[bytes],
    block: bytes,
    enc_privkey: bytes,
) -> bytes:
    chain = pack_share_hash_chain(share_hash_chain)
    tree = b"".join(block_hash_tree)
    sig = SDMF_HEADER_SIZE + len(verification_key)
    chain_at = sig + len(signature)
    tree_at = chain_at + len(chain)
    data_at = tree_at + len(tree)
    privkey_at = data_at + len(block)
    offsets = MutableOffsets(
        enc_privkey=privkey_at,
        share_hash_chain=chain_at,
        signature=sig,
        verification_key=SDMF_HEADER_SIZE,
        verification_key_end=sig,
        share_data=data_at,
        block_hash_tree=tree_at,
        eof=privkey_at + len(enc_privkey),
    )
    return b"".join(
        [prefix.pack(), offsets.pack(SDMF_VERSION), verification_key, signature, chain, tree, block, enc_privkey]
    )


def mdmf_offsets(
    prefix: SignedPrefix, enc_privkey_size: int, chain_size: int, signature_size: int, vk_size: int
) -> MutableOffsets:
    chain_at = MDMF_HEADER_SIZE + enc_privkey_size
    sig_at = chain_at + chain_size
    vk_at = sig_at + signature_size
    vk_end = vk_at + vk_size
    if vk_end > MDMF_SHARE_DATA_OFFSET:
        raise ValueError("MDMF key, chain and signature do not fit in their reserved space")
    tree_at = MDMF_SHARE_DATA_OFFSET + prefix.share_data_size()
    return MutableOffsets(
        enc_privkey=MDMF_HEADER_SIZE,
        share_hash_chain=chain_at,
        signature=sig_at,
        verification_key=vk_at,
        verification_key_end=vk_end,
        share_data=MDMF_SHARE_DATA_OFFSET,
        block_hash_tree=tree_at,
        eof=tree_at + tree_size(prefix.num_segments) * HASH_SIZE,
    )


def pack_mdmf_header_region(
    prefix: SignedPrefix,
    enc_privkey: bytes,
    share_hash_chain: dict[int, bytes],
    signature: bytes,
    verification_key: bytes,
) -> tuple[MutableOffsets, bytes]:
    """Offsets and the bytes from 0 up to the share data (the reserved gap zero-filled)."""
    chain = pack_share_hash_chain(share_hash_chain)
    offsets = mdmf_offsets(prefix, len(enc_privkey), len(chain), len(signature), len(verification_key))
    region = b"".join([prefix.pack(), offsets.pack(MDMF_VERSION), enc_privkey, chain, signature, verification_key])
    return offsets, region.ljust(MDMF_SHARE_DATA_OFFSET, b"\0")
