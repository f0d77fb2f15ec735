"""`blackmatch debug ...`: format tools that need no grid."""

import argparse
from collections.abc import Iterator
from pathlib import Path

from lafs_core import base32
from lafs_core.caps import Cap, LiteralCap
from lafs_core.errors import LafsError
from lafs_core.immutable.encode import ChkEncoder, convergent_key
from lafs_core.immutable.params import DEFAULT_MAX_SEGMENT_SIZE, LIT_THRESHOLD, ChkParameters

from .node_options import optional_node

READ_CHUNK = 1024 * 1024


def read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


def file_cap(path: Path, convergence: bytes, needed: int, total: int, max_segment_size: int) -> Cap:
    """The cap `path` gets when uploaded with these settings, computed in two streaming passes."""
    size = path.stat().st_size
    if size <= LIT_THRESHOLD:
        return LiteralCap(path.read_bytes())
    params = ChkParameters.for_size(size, needed, total, max_segment_size)
    encoder = ChkEncoder(convergent_key(read_chunks(path), convergence, params), params)
    for chunk in read_chunks(path):
        for _ in encoder.write(chunk):
            pass
    for _ in encoder.finish():
        pass
    assert encoder.cap is not None
    return encoder.cap


def cap_command(args: argparse.Namespace) -> int:
    node = optional_node(args)
    encoding = node.encoding() if node else None
    needed = args.needed or (encoding.needed if encoding else 3)
    total = args.total or (encoding.total if encoding else 10)
    if not 1 <= needed <= total <= 256:
        raise LafsError(f"need 1 <= K <= N <= 256, got K={needed} N={total}")
    max_segment_size = args.max_segment_size or DEFAULT_MAX_SEGMENT_SIZE
    if max_segment_size < 1:
        raise LafsError("--max-segment-size must be positive")
    if args.convergence is not None:
        try:
            convergence = base32.decode(args.convergence.strip())
        except ValueError:
            raise LafsError("--convergence is not a base32 secret") from None
    elif node is not None:
        convergence = node.convergence_secret()
    elif args.file.stat().st_size <= LIT_THRESHOLD:
        convergence = b""
    else:
        raise LafsError("no convergence secret: give --convergence BASE32 or -d NODEDIR")
    print(file_cap(args.file, convergence, needed, total, max_segment_size))
    return 0
