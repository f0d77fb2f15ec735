"""Writing a version to servers as read-test-write vectors, and MDMF in-place updates of a segment range.

Every write is conditional: a share the servermap saw must still carry the checkstring seen (version, seqnum,
root hash), and a share believed absent must still be absent. Another writer who got there first makes the
test fail; the server then writes nothing and the caller reports an UncoordinatedWriteError instead of
overwriting that writer's version.
"""

import os
from collections.abc import Iterable, Mapping

from .. import rsa
from ..errors import LafsError
from ..hashes import SALT_SIZE
from ..hashtree import HashTree
from .encode import EncodedSegment, RandomBytes, encode_segment, leaf_hash
from .keys import WriterKeys
from .layout import MDMF_VERSION, SignedPrefix, pack_mdmf_header_region
from .retrieve import ServerMap, ShareRef
from .slot import TestAndWrite, TestVector, WriteVector, new_share_test


class UncoordinatedWriteError(LafsError):
    """Another writer changed the file between our read and our write; nothing of ours was applied there."""


def next_seqnum(servermap: ServerMap | None) -> int:
    """One more than anything seen, so the new version supersedes every existing one."""
    return (servermap.highest_seqnum() if servermap else 0) + 1


def share_tests(servermap: ServerMap | None, ref: ShareRef) -> tuple[TestVector, ...]:
    """The tests guarding a write to `ref`: its seen checkstring, or absence if none was seen."""
    checkstring = servermap.checkstring(ref) if servermap else None
    if checkstring is None:
        return (new_share_test(),)
    return (TestVector(0, len(checkstring), checkstring),)


def publish_vectors(
    shares: list[bytes], placements: Iterable[ShareRef], servermap: ServerMap | None
) -> dict[ShareRef, TestAndWrite]:
    """Whole-share writes of a new version to where the placements put each share number."""
    return {
        ref: TestAndWrite(share_tests(servermap, ref), (WriteVector(0, shares[ref.shnum]),), None) for ref in placements
    }


def mdmf_update_vectors(
    keys: WriterKeys,
    servermap: ServerMap,
    old: SignedPrefix,
    old_leaves: Mapping[int, list[bytes]],
    start_segment: int,
    plaintext: bytes,
    random_bytes: RandomBytes = os.urandom,
) -> tuple[SignedPrefix, dict[ShareRef, TestAndWrite]]:
    """Replace an MDMF file's contents from segment `start_segment` on, rewriting only those segments.

    `plaintext` is the new content from `start_segment * segment_size` to the new end of the file;
    `old_leaves` holds, for every share number, the block-tree leaves of the old version (read from the
    shares' block hash trees). Returns the new version and the writes for every share of the old version.
    """
    if old.version != MDMF_VERSION:
        raise ValueError("in-place updates are an MDMF feature; publish SDMF files whole")
    segsize = old.segment_size
    start = start_segment * segsize
    if start > old.data_length:
        raise ValueError("an update cannot start past the end of the file")
    if set(old_leaves) != set(range(old.total)):
        raise ValueError("the update needs the block-tree leaves of every share number")
    data_length = start + len(plaintext)
    seqnum = next_seqnum(servermap)
    segments: list[EncodedSegment] = []
    for offset in range(0, len(plaintext), segsize):
        salt = random_bytes(SALT_SIZE)
        segments.append(encode_segment(keys.readkey, plaintext[offset : offset + segsize], old.needed, old.total, salt))
    new = SignedPrefix(MDMF_VERSION, seqnum, b"", None, old.needed, old.total, segsize, data_length)
    block_trees = []
    for shnum in range(old.total):
        kept = list(old_leaves[shnum][:start_segment])
        if len(kept) != start_segment:
            raise ValueError(f"share {shnum}: missing block-tree leaves of the kept segments")
        fresh = [leaf_hash(MDMF_VERSION, seg.salt, seg.blocks[shnum]) for seg in segments]
        block_trees.append(HashTree((kept + fresh)[: new.num_segments]))
    share_tree = HashTree([tree[0] for tree in block_trees])
    new = SignedPrefix(MDMF_VERSION, seqnum, share_tree[0], None, old.needed, old.total, segsize, data_length)
    signature = rsa.sign(keys.private_key, new.pack())
    vectors: dict[ShareRef, TestAndWrite] = {}
    for ref in servermap.shares_of(old):
        chain = {i: share_tree[i] for i in share_tree.needed_hashes(ref.shnum)}
        offsets, head = pack_mdmf_header_region(new, keys.encrypted_private_key, chain, signature, keys.public_key_der)
        stride = new.block_size + SALT_SIZE
        writes = [WriteVector(0, head)]
        writes += [
            WriteVector(offsets.share_data + (start_segment + i) * stride, seg.salt + seg.blocks[ref.shnum])
            for i, seg in enumerate(segments)
        ]
        writes.append(WriteVector(offsets.block_hash_tree, b"".join(block_trees[ref.shnum])))
        vectors[ref] = TestAndWrite(share_tests(servermap, ref), tuple(writes), None)
    return new, vectors
