"""Tahoe's "crs" codec: zfec systematic Reed-Solomon over k equal pieces of a segment.

Blocks 0..k-1 are the data pieces themselves, so encoding only computes the N-k check blocks and decoding from
the first k shares is a join.
"""

import zfec


class CrsCodec:
    """Encoder and decoder for one (segment size, k, N); the segment size must be a multiple of k."""

    def __init__(self, segment_size: int, needed: int, total: int) -> None:
        if not 1 <= needed <= total <= 256:
            raise ValueError(f"bad encoding parameters k={needed} N={total}")
        if segment_size % needed:
            raise ValueError(f"segment size {segment_size} is not a multiple of k={needed}")
        self.segment_size = segment_size
        self.needed = needed
        self.total = total
        self.block_size = segment_size // needed
        self._encoder = zfec.Encoder(needed, total)
        self._decoder = zfec.Decoder(needed, total)
        self._check_numbers = tuple(range(needed, total))

    def serialized_params(self) -> bytes:
        """`b"segsize-k-N"`, as written into the UEB."""
        return b"%d-%d-%d" % (self.segment_size, self.needed, self.total)

    def encode(self, segment: bytes) -> list[bytes | memoryview]:
        """Split a full segment into k pieces and return all N blocks (pieces first, then check blocks).

        The k data blocks are views into `segment`, not copies: pass bytes, or a buffer nobody changes.
        """
        if len(segment) != self.segment_size:
            raise ValueError(f"segment is {len(segment)} bytes, codec wants {self.segment_size}")
        view = memoryview(segment)
        size = self.block_size
        pieces = tuple(view[i * size : (i + 1) * size] for i in range(self.needed))
        checks = self._encoder.encode(pieces, self._check_numbers) if self._check_numbers else []
        return [*pieces, *checks]

    def decode(self, blocks: dict[int, bytes]) -> bytes:
        """Rebuild the segment from any k blocks (block number -> bytes)."""
        numbers = sorted(blocks)[: self.needed]
        if len(numbers) < self.needed:
            raise ValueError(f"need {self.needed} blocks, got {len(numbers)}")
        if numbers == list(range(self.needed)):
            return b"".join(blocks[n] for n in numbers)
        pieces = self._decoder.decode(tuple(blocks[n] for n in numbers), tuple(numbers))
        return b"".join(pieces)
