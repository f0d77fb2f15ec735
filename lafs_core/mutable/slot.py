"""The read-test-write vocabulary of mutable slots (`storage/server.py` `slot_testv_and_readv_and_writev`).

A writer sends, per share, test vectors that must all hold and write vectors applied if they do; the server
answers with what a read vector found. Tahoe's HTTP API only compares for equality. Both the client (which
builds the vectors) and the server (which evaluates them) use these definitions.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TestVector:
    """Passes when the share's bytes [offset, offset+size), cut at its end, equal `specimen` (missing = b"")."""

    __test__ = False  # not a pytest test class, despite the name

    offset: int
    size: int
    specimen: bytes


@dataclass(frozen=True)
class WriteVector:
    offset: int
    data: bytes


@dataclass(frozen=True)
class TestAndWrite:
    """What one share of a read-test-write request asks: all tests must pass for any write to happen."""

    __test__ = False

    tests: tuple[TestVector, ...]
    writes: tuple[WriteVector, ...]
    new_length: int | None = None


def new_share_test() -> TestVector:
    """The test a writer uses for a share it believes absent: it passes only on a missing or empty share."""
    return TestVector(0, 1, b"")


def all_tests_hold(read: Callable[[int, int], bytes] | None, tests: Sequence[TestVector]) -> bool:
    """Evaluate test vectors against a share read by `read(offset, size)` (None when the share is absent)."""
    for test in tests:
        # One byte past the specimen is enough to tell "equal" from "longer": never read more than that.
        actual = b"" if read is None else read(test.offset, min(test.size, len(test.specimen) + 1))
        if actual != test.specimen:
            return False
    return True


def apply_writes(data: bytes, writes: Sequence[WriteVector], new_length: int | None) -> bytes:
    """The share data after the writes, holes zero-filled; `new_length` truncates (0 deletes, larger ignored)."""
    buffer = bytearray(data)
    for write in writes:
        end = write.offset + len(write.data)
        if end > len(buffer):
            buffer.extend(bytes(end - len(buffer)))
        buffer[write.offset : end] = write.data
    if new_length is not None and new_length < len(buffer):
        del buffer[new_length:]
    return bytes(buffer)
