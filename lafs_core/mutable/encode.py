"""Building the shares of one version of a mutable file (the pure half of `mutable/publish.py`).

Each segment gets a fresh random salt; its AES key is `H(salt, readkey)` with a zero counter. SDMF has one
segment and keeps the salt in the signed header; MDMF keeps every segment's salt in front of its block, and
its block hashes cover the salt. The signed prefix is signed with RSA-PSS. Randomness comes from
`random_bytes`, so tests can replay a real Tahoe upload's salts.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

from .. import rsa
from ..codec import CrsCodec
from ..crypto import aes_ctr
from ..hashes import SALT_SIZE, block_hash, salted_block_hash, ssk_readkey_data_hash
from ..hashtree import HashTree
from .keys import WriterKeys
from .layout import (
    MDMF_SEGMENT_SIZE,
    MDMF_VERSION,
    SDMF_VERSION,
    SignedPrefix,
    next_multiple,
    pack_mdmf_header_region,
    pack_sdmf_share,
)

RandomBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class EncodedSegment:
    """One segment's salt and the N blocks it became."""

    salt: bytes
    blocks: list[bytes]


@dataclass(frozen=True)
class EncodedVersion:
    """A complete version: its signed prefix and every share's bytes, by share number."""

    prefix: SignedPrefix
    shares: list[bytes]


def segment_size_for(version: int, data_length: int, needed: int) -> int:
    if version == SDMF_VERSION:
        return next_multiple(data_length, needed)
    return next_multiple(MDMF_SEGMENT_SIZE, needed)


def encode_segment(readkey: bytes, plaintext: bytes, needed: int, total: int, salt: bytes) -> EncodedSegment:
    """Encrypt one segment under its salt and erasure-code it, zero-padding to a multiple of k."""
    crypttext = aes_ctr(ssk_readkey_data_hash(salt, readkey), plaintext)
    padded = crypttext + bytes(next_multiple(len(crypttext), needed) - len(crypttext))
    blocks = CrsCodec(len(padded), needed, total).encode(padded)
    return EncodedSegment(salt, [bytes(b) for b in blocks])


def leaf_hash(version: int, salt: bytes, block: bytes) -> bytes:
    """Block-tree leaf: MDMF hashes the salt with the block, SDMF the block alone."""
    return salted_block_hash(salt, block) if version == MDMF_VERSION else block_hash(block)


def assemble_shares(
    keys: WriterKeys,
    seqnum: int,
    data_length: int,
    needed: int,
    total: int,
    version: int,
    segments: list[EncodedSegment],
    sdmf_salt: bytes | None = None,
) -> EncodedVersion:
    """Hash trees, signature and layout around already-encoded segments (all of them, in order)."""
    segment_size = segment_size_for(version, data_length, needed)
    leaves = [[leaf_hash(version, seg.salt, seg.blocks[shnum]) for seg in segments] for shnum in range(total)]
    block_trees = [HashTree(share_leaves) for share_leaves in leaves]
    share_tree = HashTree([tree[0] for tree in block_trees])
    if version == SDMF_VERSION:
        salt = segments[0].salt if segments else sdmf_salt
        assert salt is not None, "an empty SDMF file still needs a salt"
    else:
        salt = None
    prefix = SignedPrefix(version, seqnum, share_tree[0], salt, needed, total, segment_size, data_length)
    signature = rsa.sign(keys.private_key, prefix.pack())
    enc_privkey = keys.encrypted_private_key
    shares = []
    for shnum in range(total):
        chain = {i: share_tree[i] for i in share_tree.needed_hashes(shnum)}
        tree = list(block_trees[shnum])
        if version == SDMF_VERSION:
            block = segments[0].blocks[shnum] if segments else b""
            shares.append(pack_sdmf_share(prefix, keys.public_key_der, signature, chain, tree, block, enc_privkey))
        else:
            _offsets, head = pack_mdmf_header_region(prefix, enc_privkey, chain, signature, keys.public_key_der)
            body = b"".join(seg.salt + seg.blocks[shnum] for seg in segments)
            shares.append(head + body + b"".join(tree))
    return EncodedVersion(prefix, shares)


def encode_version(
    keys: WriterKeys,
    seqnum: int,
    plaintext: bytes,
    needed: int,
    total: int,
    version: int = SDMF_VERSION,
    random_bytes: RandomBytes = os.urandom,
) -> EncodedVersion:
    """All N shares of a new version holding `plaintext`."""
    if not 1 <= needed <= total <= 255:
        raise ValueError(f"bad encoding parameters k={needed} N={total}")
    if seqnum < 1:
        raise ValueError("sequence numbers start at 1")
    segment_size = segment_size_for(version, len(plaintext), needed)
    segments = []
    for start in range(0, len(plaintext), segment_size or 1):
        piece = plaintext[start : start + segment_size]
        segments.append(encode_segment(keys.readkey, piece, needed, total, random_bytes(SALT_SIZE)))
    sdmf_salt = random_bytes(SALT_SIZE) if version == SDMF_VERSION and not segments else None
    return assemble_shares(keys, seqnum, len(plaintext), needed, total, version, segments, sdmf_salt)
