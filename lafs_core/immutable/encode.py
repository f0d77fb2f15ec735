"""Streaming CHK encoder: plaintext in chunks in, share bytes out as positioned writes, then the cap.

Memory stays at one segment plus the per-segment hashes, whatever the file size. Every share has the same
header and block offsets, so each output is a `ShareWrite`: "at this offset, share i gets data[i]". The
writes of one encoder cover every byte of every share exactly once, in increasing offset order per share.

The convergent key needs a full pass over the plaintext before encryption starts; `convergent_key` does that
pass, and callers that stream from a file read it twice, as Tahoe does.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..caps import ChkCap, LiteralCap
from ..codec import CrsCodec
from ..crypto import AesCtr
from ..errors import LafsError
from ..hashes import (
    block_hash,
    convergence_hasher,
    crypttext_hasher,
    crypttext_segment_hash,
    uri_extension_hash,
)
from ..hashtree import HashTree, needed_hash_set
from .layout import ShareOffsets, expected_offsets, pack_share_hash_chain, ueb_for
from .params import DEFAULT_MAX_SEGMENT_SIZE, LIT_THRESHOLD, ChkParameters


@dataclass(frozen=True)
class ShareWrite:
    """Bytes to put at `offset` in every share: share number i gets `data[i]` (bytes or a read-only view)."""

    offset: int
    data: Sequence[bytes | memoryview]


class ReencodingMismatchError(LafsError):
    """Re-encoding produced another file than the cap names: its shares must not be stored."""


def convergent_key(chunks: Iterable[bytes], convergence: bytes, params: ChkParameters) -> bytes:
    """The convergent AES key of the plaintext given as chunks, for these encoding parameters."""
    hasher = convergence_hasher(convergence, params.needed, params.total, params.segment_size)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.digest()


class ChkEncoder:
    """Encode one file of known size, fed in arbitrary chunks.

    `write` and `finish` yield ShareWrites; after `finish` the `cap` attribute holds the file's CHK cap.
    The first write to come out is the header at offset 0.

    Given `expected`, the encoder regenerates an existing file's shares (repair): it raises ReencodingMismatchError
    instead of yielding the trailers if the result is not that file. The trailers are the last bytes of every
    share, so a mismatch is found before any share is complete.
    """

    def __init__(self, key: bytes, params: ChkParameters, expected: ChkCap | None = None) -> None:
        self.params = params
        self.key = key
        self.expected = expected
        self.offsets: ShareOffsets = expected_offsets(params)
        self.share_size = self.offsets.share_size(len(ueb_for(params, bytes(32), bytes(32), bytes(32)).pack()))
        self.cap: ChkCap | None = None
        self._codec = CrsCodec(params.segment_size, params.needed, params.total)
        self._tail_codec = CrsCodec(params.padded_tail_size, params.needed, params.total)
        self._cipher = AesCtr(key)
        self._crypttext_hasher = crypttext_hasher()
        self._segment_hashes: list[bytes] = []
        self._block_hashes: list[list[bytes]] = [[] for _ in range(params.total)]
        self._buffer = bytearray()
        self._received = 0
        self._header_sent = False

    def write(self, chunk: bytes) -> Iterator[ShareWrite]:
        """Take the next plaintext bytes; yield the writes of every segment they complete."""
        if self._received + len(chunk) > self.params.size:
            raise ValueError(f"more than the declared {self.params.size} bytes of plaintext")
        self._received += len(chunk)
        if not self._header_sent:
            self._header_sent = True
            yield ShareWrite(0, [self.offsets.pack()] * self.params.total)
        segsize = self.params.segment_size
        view = memoryview(chunk)
        if not self._buffer:
            # Fast path: encode whole segments straight from the caller's buffer.
            while len(view) >= segsize and len(self._segment_hashes) < self.params.num_segments - 1:
                yield self._encode_segment(view[:segsize])
                view = view[segsize:]
        self._buffer += view
        while len(self._buffer) >= segsize and len(self._segment_hashes) < self.params.num_segments - 1:
            yield self._encode_segment(memoryview(self._buffer)[:segsize].tobytes())
            del self._buffer[:segsize]

    def finish(self) -> Iterator[ShareWrite]:
        """Encode the tail segment and yield the hash trees and UEB of each share; sets `cap`."""
        if self._received != self.params.size:
            raise ValueError(f"got {self._received} bytes of plaintext, expected {self.params.size}")
        yield from self.write(b"")
        yield self._encode_segment(bytes(self._buffer), tail=True)
        self._buffer = bytearray()
        yield self._trailers()

    def _encode_segment(self, plaintext: bytes | memoryview, tail: bool = False) -> ShareWrite:
        segnum = len(self._segment_hashes)
        crypttext = self._cipher.update(plaintext)
        self._crypttext_hasher.update(crypttext)
        self._segment_hashes.append(crypttext_segment_hash(crypttext))
        if tail:
            codec = self._tail_codec
            crypttext = crypttext + bytes(codec.segment_size - len(crypttext))
        else:
            codec = self._codec
        blocks = codec.encode(crypttext)
        for hashes, block in zip(self._block_hashes, blocks, strict=True):
            hashes.append(block_hash(block))
        return ShareWrite(self.offsets.data + segnum * self.params.block_size, blocks)

    def _trailers(self) -> ShareWrite:
        params = self.params
        crypttext_tree = HashTree(self._segment_hashes)
        block_trees = [HashTree(hashes) for hashes in self._block_hashes]
        share_tree = HashTree([tree[0] for tree in block_trees])
        ueb = ueb_for(params, self._crypttext_hasher.digest(), crypttext_tree[0], share_tree[0]).pack()
        assert self.offsets.share_size(len(ueb)) == self.share_size, "UEB length differs from the allocated one"
        unused_plaintext_tree = bytes(len(crypttext_tree) * 32)
        crypttext_bytes = b"".join(crypttext_tree)
        length_field = len(ueb).to_bytes(self.offsets.fieldsize, "big")
        trailers = []
        for shnum, tree in enumerate(block_trees):
            chain = [(i, share_tree[i]) for i in needed_hash_set(params.total, shnum, include_leaf=True)]
            trailers.append(
                unused_plaintext_tree
                + crypttext_bytes
                + b"".join(tree)
                + pack_share_hash_chain(chain)
                + length_field
                + ueb
            )
        cap = ChkCap(self.key, uri_extension_hash(ueb), params.needed, params.total, params.size)
        if self.expected is not None and cap != self.expected:
            raise ReencodingMismatchError("re-encoding the file did not reproduce its cap (UEB hash differs)")
        self.cap = cap
        return ShareWrite(self.offsets.plaintext_hash_tree, trailers)


def encode_bytes(
    data: bytes,
    *,
    convergence: bytes | None = None,
    key: bytes | None = None,
    needed: int = 3,
    total: int = 10,
    max_segment_size: int = DEFAULT_MAX_SEGMENT_SIZE,
) -> tuple[ChkCap | LiteralCap, list[bytes]]:
    """Encode a whole in-memory file: its cap and the N share byte-strings (none for LIT files).

    Give `convergence` for a convergent key or `key` for a chosen one.
    """
    if len(data) <= LIT_THRESHOLD:
        return LiteralCap(bytes(data)), []
    params = ChkParameters.for_size(len(data), needed, total, max_segment_size)
    if key is None:
        if convergence is None:
            raise ValueError("give a convergence secret or a key")
        key = convergent_key([data], convergence, params)
    encoder = ChkEncoder(key, params)
    shares = [bytearray(encoder.share_size) for _ in range(total)]
    for write in (*encoder.write(data), *encoder.finish()):
        for share, piece in zip(shares, write.data, strict=True):
            share[write.offset : write.offset + len(piece)] = piece
    assert encoder.cap is not None
    return encoder.cap, [bytes(s) for s in shares]
