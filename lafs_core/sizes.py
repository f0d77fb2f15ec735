"""Byte counts as blackmatch's settings write them: digits and an optional binary suffix K, M, G or T (also KiB,
MB, ...), as in `--cache-size 512M` or tahoe.cfg `repair.bandwidth = 1M`. One parser, so a size means the same on
the command line and in a configuration file."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError when it is not a size."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size in bytes: {text!r}")
    return int(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def format_size(count: int) -> str:
    """Bytes for people to read, in the same binary units: `512 B`, `1.5 KiB`, `12.0 MiB`."""
    for suffix in ("T", "G", "M", "K"):
        if count >= _SUFFIXES[suffix]:
            return f"{count / _SUFFIXES[suffix]:.1f} {suffix}iB"
    return f"{count} B"
