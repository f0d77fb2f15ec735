"""Put and get of one file against real local GBS storage servers, against encode and decode alone, same run.

    .venv/bin/python -m bench.bench_grid [--size-mib 256] [--servers 5] [--needed 3] [--happy 5] [--total 10]
                                         [--no-cli] [--profile DIR]

Starts `--servers` `blackmatch storage run` processes on 127.0.0.1 (tests/storage_cluster.py) and a node
directory using them. Put = upload_immutable of a file of random bytes, in-process through the grid API
(convergent-key pass, encode, TLS + HTTP to every server, each share fsynced by its server). Get =
ImmutableFile.copy_to of every byte, verified against the hash trees and then against the file's SHA-256
(the final hash is not timed). The baseline is the CHK codec alone on the same data, no network
(bench_codec's encode and decode), so the ratios show what the network path costs on top. The `blackmatch
put` and `get` command lines are timed end to end too (process start, fresh convergence secret so the
upload is not deduplicated). With `--profile DIR`, put and get run a second time under cProfile
(put then uploads under a third convergence secret) and the stats are written to DIR.
"""

import argparse
import cProfile
import hashlib
import os
import tempfile
from pathlib import Path

import trio

from lafs_core.caps import ChkCap
from lafs_core.grid.download import ImmutableFile
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid
from lafs_core.grid.upload import file_chunks, upload_immutable
from lafs_core.immutable.params import ChkParameters
from tests.storage_cluster import StorageCluster, blackmatch

from .bench_codec import MB, chk_decode, chk_encode, first_shares, timed


def write_random_file(path: Path, size: int) -> str:
    """`size` random bytes in `path`; returns their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, size, 16 << 20):
            piece = os.urandom(min(16 << 20, size - start))
            digest.update(piece)
            f.write(piece)
    return digest.hexdigest()


async def put(node: NodeDirectory, path: Path, size: int) -> ChkCap:
    grid = open_grid(node)
    try:
        cap = await upload_immutable(grid, size, file_chunks(path))
    finally:
        await grid.aclose()
    assert isinstance(cap, ChkCap)
    return cap


async def get(node: NodeDirectory, cap: ChkCap, out: list[bytes]) -> None:
    """Every byte of `cap`, as the pieces handed to the sink (kept, not copied: hashing waits for the clock)."""
    grid = open_grid(node)

    async def sink(data: bytes) -> None:
        out.append(data)

    try:
        await ImmutableFile(grid, cap).copy_to(sink)
    finally:
        await grid.aclose()


def sha256_of(pieces: list[bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def codec_alone(path: Path, params: ChkParameters) -> tuple[float, float]:
    """Seconds to encode the file's bytes and to decode them from k shares in memory (bench_codec's runs)."""
    data = path.read_bytes()
    t_encode = timed(lambda: chk_encode(data, params, lambda write: None))
    cap, shares = first_shares(data, params)
    t_decode = timed(lambda: chk_decode(cap, params, shares))
    return t_encode, t_decode


class CpuClock:
    """CPU seconds used by this process (every thread) and by the server processes, to tell a run that is
    CPU-bound (cores busy) from one that waits (round trips, disk)."""

    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def read(self) -> tuple[float, float]:
        own = os.times()
        servers = 0.0
        for pid in self.server_pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            servers += (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        return own.user + own.system, servers

    def timed(self, fn) -> tuple[float, float, float]:
        """(wall seconds, client CPU seconds, servers' CPU seconds) of `fn()`."""
        client0, servers0 = self.read()
        wall = timed(fn)
        client1, servers1 = self.read()
        return wall, client1 - client0, servers1 - servers0


def profiled(fn, path: Path):
    profile = cProfile.Profile()
    profile.enable()
    try:
        return fn()
    finally:
        profile.disable()
        profile.dump_stats(path)


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """--servers (local GBS server processes) and the encoding --needed/--happy/--total, as every grid bench takes."""
    parser.add_argument("--servers", type=int, default=5)
    parser.add_argument("--needed", type=int, default=3)
    parser.add_argument("--happy", type=int, default=5)
    parser.add_argument("--total", type=int, default=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    add_grid_arguments(parser)
    parser.add_argument("--no-cli", action="store_true", help="skip the `blackmatch put`/`get` timings")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="also run put and get under cProfile")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024

    with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
        root = Path(tmp)
        source = root / "data"
        expected = write_random_file(source, size)
        os.sync()  # the file's own writeback must not compete with the put's

        # --- baseline: the codec alone on the same bytes ------------------------------------------------------
        params = ChkParameters.for_size(size, args.needed, args.total)
        t_encode, t_decode = codec_alone(source, params)

        # --- the grid -------------------------------------------------------------------------------------------
        with StorageCluster(root / "servers", args.servers) as cluster:
            node = NodeDirectory(cluster.create_node(root / "node", args.needed, args.happy, args.total))
            clock = CpuClock([p.process.pid for p in cluster.processes if p.process is not None])
            caps: list[ChkCap] = []
            t_put, *cpu_put = clock.timed(lambda: caps.append(trio.run(put, node, source, size)))
            cap = caps[0]
            out: list[bytes] = []
            t_get, *cpu_get = clock.timed(lambda: trio.run(get, node, cap, out))
            assert sha256_of(out) == expected, "get returned different bytes"
            del out

            t_cli_put = t_cli_get = None
            if not args.no_cli:
                cli_node = cluster.create_node(root / "cli-node", args.needed, args.happy, args.total)
                done: list[str] = []
                t_cli_put = timed(
                    lambda: done.append(blackmatch("put", "-d", str(cli_node), str(source)).stdout.decode().strip())
                )
                copy = root / "copy"
                t_cli_get = timed(lambda: blackmatch("get", "-d", str(cli_node), done[0], str(copy)))
                with open(copy, "rb") as f:
                    assert hashlib.file_digest(f, "sha256").hexdigest() == expected, "blackmatch get differs"
                copy.unlink()

            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                prof_node = NodeDirectory(
                    cluster.create_node(root / "profile-node", args.needed, args.happy, args.total)
                )
                profiled(lambda: trio.run(put, prof_node, source, size), args.profile / "put.prof")
                out = []
                profiled(lambda: trio.run(get, node, cap, out), args.profile / "get.prof")
                assert sha256_of(out) == expected

    print(
        f"Grid put/get, {args.size_mib} MiB, {args.servers} local GBS servers, k={args.needed} happy={args.happy} "
        f"N={args.total}, segment {params.segment_size} bytes"
    )
    print(f"  encode alone (no network)  {size / t_encode / MB:9.1f} MB/s")
    print(f"  decode alone (no network)  {size / t_decode / MB:9.1f} MB/s")
    cores = os.cpu_count()
    for name, seconds, (client, servers), base, what in (
        ("put", t_put, cpu_put, t_encode, "encode"),
        ("get", t_get, cpu_get, t_decode, "decode"),
    ):
        print(
            f"  {name} (grid API)             {size / seconds / MB:9.1f} MB/s   ratio to {what} {base / seconds:5.2f}"
            f"   (CPU: client {client:.1f} s, servers {servers:.1f} s; {(client + servers) / seconds:.1f} of "
            f"{cores} cores busy)"
        )
    if t_cli_put is not None and t_cli_get is not None:
        put_ratio, get_ratio = t_encode / t_cli_put, t_decode / t_cli_get
        print(
            f"  blackmatch put (CLI)       {size / t_cli_put / MB:9.1f} MB/s   ratio to encode {put_ratio:5.2f}"
            f"   ({t_cli_put:.2f} s wall, process start included)"
        )
        print(
            f"  blackmatch get (CLI)       {size / t_cli_get / MB:9.1f} MB/s   ratio to decode {get_ratio:5.2f}"
            f"   ({t_cli_get:.2f} s wall, process start included)"
        )
    if args.profile:
        print(f"  profiles: {args.profile / 'put.prof'}, {args.profile / 'get.prof'}")


if __name__ == "__main__":
    main()
