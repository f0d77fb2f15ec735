"""Encoding parameters of a CHK file and the sizes that follow from them (`immutable/upload.py`, `encode.py`)."""

from dataclasses import dataclass

DEFAULT_MAX_SEGMENT_SIZE = 1024 * 1024
"""Tahoe 1.19+ default. Up to 1.18 (and in the test vectors) it was 128 KiB; the cap depends on it."""

LIT_THRESHOLD = 55
"""Files of at most this many bytes are LIT caps: the data lives in the cap and no share is stored."""


def div_ceil(n: int, d: int) -> int:
    return (n + d - 1) // d


def next_multiple(n: int, k: int) -> int:
    return div_ceil(n, k) * k


@dataclass(frozen=True)
class ChkParameters:
    """k, N, the effective segment size and the file size; every derived size is a property."""

    needed: int
    total: int
    segment_size: int
    size: int

    def __post_init__(self) -> None:
        if not 1 <= self.needed <= self.total <= 256:
            raise ValueError(f"bad encoding parameters k={self.needed} N={self.total}")
        if self.size < 1 or self.segment_size < 1 or self.segment_size % self.needed:
            raise ValueError(f"bad segment size {self.segment_size} for size {self.size}, k={self.needed}")

    @classmethod
    def for_size(
        cls, size: int, needed: int = 3, total: int = 10, max_segment_size: int = DEFAULT_MAX_SEGMENT_SIZE
    ) -> "ChkParameters":
        """Parameters Tahoe's uploader picks: segment = min(max, size) rounded up to a multiple of k."""
        return cls(needed, total, next_multiple(min(max_segment_size, size), needed), size)

    @property
    def num_segments(self) -> int:
        return div_ceil(self.size, self.segment_size)

    @property
    def tail_size(self) -> int:
        """Plaintext bytes in the last segment."""
        return self.size % self.segment_size or self.segment_size

    @property
    def padded_tail_size(self) -> int:
        return next_multiple(self.tail_size, self.needed)

    @property
    def block_size(self) -> int:
        return self.segment_size // self.needed

    @property
    def tail_block_size(self) -> int:
        return self.padded_tail_size // self.needed

    @property
    def share_data_size(self) -> int:
        """Bytes of blocks in each share: equal to ceil(size / k)."""
        return (self.num_segments - 1) * self.block_size + self.tail_block_size

    def segment_span(self, segnum: int) -> tuple[int, int]:
        """Plaintext [start, end) of a segment."""
        start = segnum * self.segment_size
        return start, min(start + self.segment_size, self.size)

    def block_length(self, segnum: int) -> int:
        return self.tail_block_size if segnum == self.num_segments - 1 else self.block_size

    def codec_params(self) -> bytes:
        return b"%d-%d-%d" % (self.segment_size, self.needed, self.total)

    def tail_codec_params(self) -> bytes:
        return b"%d-%d-%d" % (self.padded_tail_size, self.needed, self.total)
