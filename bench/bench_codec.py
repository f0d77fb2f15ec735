"""CHK encode and decode throughput against the raw primitives they are made of, measured in the same run.

    .venv/bin/python -m bench.bench_codec [--size-mib 256] [--needed 3] [--total 10]

Encode = convergent-key pass + encryption + zfec + every hash Tahoe's format needs, with the share writes
consumed but not stored. Decode = verified read of every segment from k shares held in memory. The baseline
is the same work done by the primitives alone (one AES-CTR pass, zfec over every segment, SHA-256 over the
bytes each path must hash), so the ratio shows what the format code costs on top.
"""

import argparse
import hashlib
import os
import time
from collections.abc import Callable

import zfec

from lafs_core.caps import ChkCap
from lafs_core.crypto import AesCtr
from lafs_core.fetch import drive
from lafs_core.immutable.decode import ChkReader
from lafs_core.immutable.encode import ChkEncoder, ShareWrite, convergent_key
from lafs_core.immutable.params import ChkParameters

MB = 1e6


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def each_segment(size: int, segsize: int, work: Callable[[int], object]) -> Callable[[], None]:
    """A loop calling `work(offset)` per segment and dropping its result, as the encoder does."""

    def loop() -> None:
        for offset in range(0, size, segsize):
            work(offset)

    return loop


def chk_encode(data: bytes, params: ChkParameters, keep: Callable[[ShareWrite], None]) -> ChkCap:
    """Convergent key, then the encoder fed 1 MiB at a time, as an upload does; `keep` consumes every write."""
    view = memoryview(data)
    key = convergent_key([data], b"bench", params)
    enc = ChkEncoder(key, params)
    for start in range(0, len(data), 1 << 20):
        for write in enc.write(view[start : start + (1 << 20)]):
            keep(write)
    for write in enc.finish():
        keep(write)
    assert enc.cap is not None
    return enc.cap


def first_shares(data: bytes, params: ChkParameters) -> tuple[ChkCap, dict[int, bytes]]:
    """The cap and shares 0..k-1 of `data`, held in memory for `chk_decode`."""
    shares = [bytearray() for _ in range(params.needed)]

    def keep(write: ShareWrite) -> None:
        for share, piece in zip(shares, write.data[: params.needed], strict=True):
            assert len(share) == write.offset
            share += piece

    cap = chk_encode(data, params, keep)
    return cap, {s: bytes(share) for s, share in enumerate(shares)}


def chk_decode(cap: ChkCap, params: ChkParameters, shares: dict[int, bytes]) -> None:
    """Verified read of every segment from the shares given (decoded plaintext dropped)."""
    readers = {s: (lambda d: lambda off, length: d[off : off + length])(data) for s, data in shares.items()}
    reader = ChkReader(cap, shares)
    for segnum in range(params.num_segments):
        drive(reader.segment(segnum), readers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--needed", type=int, default=3)
    parser.add_argument("--total", type=int, default=10)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    data = os.urandom(size)
    view = memoryview(data)
    params = ChkParameters.for_size(size, args.needed, args.total)
    segsize, k, n = params.segment_size, params.needed, params.total
    expansion = n / k

    # --- primitives alone ----------------------------------------------------------------------------------
    t_sha = timed(each_segment(size, segsize, lambda i: hashlib.sha256(view[i : i + segsize]).digest()))
    cipher = AesCtr(bytes(16))
    t_aes = timed(each_segment(size, segsize, lambda i: cipher.update(view[i : i + segsize])))
    encoder = zfec.Encoder(k, n)
    block = segsize // k
    padded = bytes(view[:segsize]).ljust(segsize, b"\0")
    pieces = tuple(padded[i * block : (i + 1) * block] for i in range(k))
    checks = tuple(range(k, n))
    t_zfec = timed(each_segment(size, segsize, lambda _i: encoder.encode(pieces, checks)))
    # Encode hashes: convergence pass, crypttext segment + whole-file hashes, N/k blocks' worth of block hashes.
    primitive_encode = t_aes + t_zfec + t_sha * (3 + expansion)
    # Decode hashes: k blocks (one segment's worth) and the crypttext segment; zfec is free on primary shares.
    primitive_decode = t_aes + t_sha * 2

    # --- blackmatch --------------------------------------------------------------------------------------
    t_encode = timed(lambda: chk_encode(data, params, lambda write: None))
    cap, shares = first_shares(data, params)  # untimed: the first k shares for the decode run
    t_decode = timed(lambda: chk_decode(cap, params, shares))

    print(f"CHK codec, {args.size_mib} MiB, k={k} N={n}, segment {segsize} bytes, one core")
    print(f"  SHA-256 alone        {size / t_sha / MB:9.1f} MB/s")
    print(f"  AES-128-CTR alone    {size / t_aes / MB:9.1f} MB/s")
    print(f"  zfec encode alone    {size / t_zfec / MB:9.1f} MB/s (of plaintext)")
    print(f"  primitives: encode   {size / primitive_encode / MB:9.1f} MB/s")
    print(f"  primitives: decode   {size / primitive_decode / MB:9.1f} MB/s")
    print(
        f"  blackmatch encode    {size / t_encode / MB:9.1f} MB/s   "
        f"ratio to primitives {primitive_encode / t_encode:5.2f}"
    )
    print(
        f"  blackmatch decode    {size / t_decode / MB:9.1f} MB/s   "
        f"ratio to primitives {primitive_decode / t_decode:5.2f}"
    )


if __name__ == "__main__":
    main()
