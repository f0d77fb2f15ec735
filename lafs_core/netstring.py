"""Netstrings (`b"%d:%s,"`), the framing Tahoe uses inside hashes, the UEB and directories."""

from .errors import FormatError


def netstring(data: bytes) -> bytes:
    """Frame `data` as a netstring."""
    return b"%d:%s," % (len(data), data)


def split_netstrings(data: bytes, *, required: int | None = None) -> list[bytes]:
    """Split a concatenation of netstrings; with `required`, insist on exactly that many.

    Raises FormatError on any framing mistake rather than guessing: this parses untrusted bytes.
    """
    items: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        value, pos = read_netstring(data, pos)
        items.append(value)
    if required is not None and len(items) != required:
        raise FormatError(f"expected {required} netstrings, found {len(items)}")
    return items


def read_netstring(data: bytes, pos: int = 0) -> tuple[bytes, int]:
    """Read one netstring starting at `pos`; return its payload and the position after it."""
    colon = data.find(b":", pos, pos + 21)
    if colon < 0:
        raise FormatError(f"netstring at {pos}: no length prefix")
    digits = data[pos:colon]
    if not digits.isdigit() or (len(digits) > 1 and digits[:1] == b"0"):
        raise FormatError(f"netstring at {pos}: bad length {digits[:20]!r}")
    length = int(digits)
    start = colon + 1
    stop = start + length
    if stop >= len(data) or data[stop : stop + 1] != b",":
        raise FormatError(f"netstring at {pos}: truncated or missing ','")
    return data[start:stop], stop + 1
