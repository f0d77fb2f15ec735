"""The sans-IO read protocol shared by the immutable and mutable readers.

A reader is a generator that yields `FetchBatch`es (share -> byte spans to read, all of them at once if the
caller likes) and is sent back the bytes; `drive` runs one over local reader functions, and the grid layer runs
the same generators over storage servers. Shares are named by any hashable key: a share number for CHK files,
(server, share number) for mutable files, whose servers may hold different versions of one share.
"""

from collections.abc import Callable, Generator, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from .hashes import HASH_SIZE

Span = tuple[int, int]
"""(offset, length) within one share."""

WHOLE_TREE_LIMIT = 64 * 1024
"""Hash-tree regions up to this size are read whole on first use; bigger ones node by node."""


@dataclass
class FetchBatch:
    """Reads a decoder needs next: share key -> spans.

    Results go back as share key -> list of bytes (one per span; short at the end of a share) or the exception
    that prevented reading that share.
    """

    requests: dict[Hashable, list[Span]] = field(default_factory=dict)


FetchResults = Mapping[Hashable, list[bytes] | BaseException]


class ByteCache:
    """Spans of one share already fetched and not yet used up."""

    def __init__(self) -> None:
        self._chunks: dict[int, bytes] = {}

    def add(self, offset: int, data: bytes) -> None:
        if data and len(data) > len(self._chunks.get(offset, b"")):
            self._chunks[offset] = data

    def get(self, offset: int, length: int) -> bytes | None:
        for start, data in self._chunks.items():
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start : offset - start + length]
        return None

    def at(self, offset: int) -> bytes | None:
        """The chunk read starting exactly at `offset`, whatever its length."""
        return self._chunks.get(offset)

    def discard(self, offset: int) -> None:
        self._chunks.pop(offset, None)

    def node_spans(self, region_start: int, num_nodes: int, nodes: Iterable[int]) -> list[Span]:
        """Spans covering the given nodes of a hash-tree region, minus those already fetched."""
        wanted = sorted(n for n in nodes if self.get(region_start + n * HASH_SIZE, HASH_SIZE) is None)
        if not wanted:
            return []
        if num_nodes * HASH_SIZE <= WHOLE_TREE_LIMIT:
            return [(region_start, num_nodes * HASH_SIZE)]
        spans: list[Span] = []
        for n in wanted:
            offset = region_start + n * HASH_SIZE
            if spans and sum(spans[-1]) == offset:
                spans[-1] = (spans[-1][0], spans[-1][1] + HASH_SIZE)
            else:
                spans.append((offset, HASH_SIZE))
        return spans

    def nodes(self, region_start: int, nodes: Iterable[int]) -> dict[int, bytes] | None:
        """The given hash nodes of a region, or None if any of them was not fetched (a truncated share)."""
        found = {}
        for n in nodes:
            value = self.get(region_start + n * HASH_SIZE, HASH_SIZE)
            if value is None:
                return None
            found[n] = value
        return found


T = TypeVar("T")
ShareReadFn = Callable[[int, int], bytes]
"""read(offset, length) -> bytes of one share; short at its end."""


def drive(steps: Generator[FetchBatch, FetchResults, T], readers: Mapping[Hashable, ShareReadFn]) -> T:
    """Run a reader generator to completion, serving its reads from local reader functions."""
    try:
        batch = next(steps)
        while True:
            results: dict[Hashable, list[bytes] | BaseException] = {}
            for key, spans in batch.requests.items():
                try:
                    results[key] = [readers[key](offset, length) for offset, length in spans]
                except (OSError, KeyError) as exc:
                    results[key] = exc
            batch = steps.send(results)
    except StopIteration as done:
        value: T = done.value  # what the generator returned
        return value


def bytes_reader(data: bytes) -> ShareReadFn:
    """A reader function over a share held in memory."""
    return lambda offset, length: data[offset : offset + length]
