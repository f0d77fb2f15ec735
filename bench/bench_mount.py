"""The mounted grid against a local-disk directory: the same file-system work on both, in the same run.

    .venv/bin/python -m bench.bench_mount [--size-mib 256] [--small-files 1000] [--entries 10000] [--servers 5]
                                          [--needed 3] [--happy 5] [--total 10] [--dir DIR]
                                          [--modes no-split,split]

Starts `--servers` `blackmatch storage run` processes on 127.0.0.1 (tests/storage_cluster.py), a node using them,
and mounts the node's root with the real `blackmatch mount` (tests/mounting.py), once per mode: `split` (the FUSE
shim forwarding to the node's grid server daemon over the RPC socket) and `no-split` (one process), each on a node
directory of its own over the same servers. Every workload runs on the mount and on a plain directory of the local
disk (under `--dir`, which must not be a tmpfs); the figures are printed side by side with the ratio mount / local
(below 1: the mount is slower), and with both modes, the ratio split / no-split.

1. Sequential write: `--size-mib` of random bytes (made in memory beforehand) written in 1 MiB writes to a new
   file, timed from the open until os.fsync returns. On the mount, fsync returns once the file is uploaded with
   happiness met (each share fsynced by its server) and its directory entry is published; locally, once the ext4
   journal has the data.
2. Cold sequential read of that file in 1 MiB reads (SHA-256 verified afterwards, untimed). The mount is unmounted
   (every upload done), its disk cache wiped and it is mounted again; the servers' share files are also dropped
   from the page cache, so the shares come from disk. Locally the file is dropped from the page cache
   (fsync + POSIX_FADV_DONTNEED), so it is a disk read.
3. Warm sequential read: the same read again (the mount's disk cache; the local page cache).
4. `--small-files` files of 4 KiB random bytes each (real CHK uploads, not literal caps) created in a new, already
   published directory, timed from the first create until os.fsync on the directory's fd returns; on the mount that
   waits until every pending entry of the directory is uploaded and published. Local disk is timed two ways, as
   fsync of a directory does not make the files' data durable there: each file fsynced before its close, then the
   directory fsynced (what durability costs file by file), and all files written, one os.sync() (the whole machine's
   dirty data), then the directory fsynced (what it costs batched, as the mount batches).
5. `ls -l` (a subprocess, output to /dev/null) of a directory of `--entries` entries, built without the mount: one
   grid API directory create with small literal-cap children, linked into the root while unmounted. Cold = the
   first listing after a fresh mount (empty disk cache); warm = the listing again. Locally the same number of tiny
   files; its "cold" listing is only the first one: the kernel still holds their inodes, and dropping them
   (drop_caches) would drop every cache of the machine.

For workloads 1 and 4 the CPU seconds of the mount (its serving process, and in split mode the grid server too),
of the storage servers and of this process (the writer, which also pays the kernel's side of FUSE) are printed, to
tell a CPU-bound run from one that waits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from lafs_core.caps import LiteralCap, parse_cap
from lafs_core.dirnode import child_entry, update_metadata
from lafs_core.grid.directory import as_directory, create_directory, linker, modify_directory
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid
from tests.mounting import MODES, Mount, fuse_unavailable, server_pid, wipe_cache
from tests.storage_cluster import StorageCluster

from .bench_codec import MB, timed
from .bench_grid import CpuClock, add_grid_arguments, sha256_of

MiB = 1 << 20
SMALL_FILE_SIZE = 4096
BIG_FILE = "big.dat"
SMALL_DIR = "small"
LISTED_DIR = "listed"


@dataclass
class Cpu:
    """CPU seconds over one workload; `mount` is None for the local-disk runs."""

    wall: float
    bench: float
    mount: float | None = None
    servers: float | None = None

    def describe(self) -> str:
        busy = (self.bench + (self.mount or 0.0) + (self.servers or 0.0)) / self.wall
        parts = [f"bench {self.bench:.2f} s"]
        if self.mount is not None:
            parts = [f"mount {self.mount:.2f} s", f"servers {self.servers:.2f} s", *parts]
        return f"CPU: {', '.join(parts)}; {busy:.1f} of {os.cpu_count()} cores busy"


@dataclass
class Results:
    """Seconds per workload of one side (local disk, or the mount in one mode), and CPU where measured."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, Cpu] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)


# --- the workloads, each on a path of either side ------------------------------------------------------------------
def sequential_write(path: Path, data: bytes) -> float:
    """Seconds to create `path`, write `data` in 1 MiB writes and fsync it (the close is after the clock)."""
    view = memoryview(data)
    fd = -1

    def write() -> None:
        nonlocal fd
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for start in range(0, len(view), MiB):
            piece = view[start : start + MiB]
            while piece:
                piece = piece[os.write(fd, piece) :]
        os.fsync(fd)

    try:
        return timed(write)
    finally:
        if fd >= 0:
            os.close(fd)


def sequential_read(path: Path, buffer: bytearray) -> float:
    """Seconds to open `path` and read it whole into `buffer` in 1 MiB reads; asserts it is `len(buffer)` long."""
    view = memoryview(buffer)

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                got = f.readinto(view[done : done + MiB])
                assert got, f"{path} ended after {done} of {len(view)} bytes"
                done += got
            assert not f.read(1), f"{path} is longer than {len(view)} bytes"

    return timed(read)


def drop_from_page_cache(paths: list[Path]) -> None:
    """Make the next read of these files come from disk (fsync first: dirty pages are not dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def small_files(directory: Path, contents: list[bytes], sync: str) -> float:
    """Seconds from the first create in `directory` (existing, empty) until the directory's fsync returns.

    sync: "dir" = fsync of the directory only (the mount's contract), "each" = every file fsynced before its close,
    "os.sync" = one os.sync() after the last close; the last two end with the directory's fsync as well.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)

    def create() -> None:
        for i, data in enumerate(contents):
            fd = os.open(directory / f"f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                assert os.write(fd, data) == len(data)
                if sync == "each":
                    os.fsync(fd)
            finally:
                os.close(fd)
        if sync == "os.sync":
            os.sync()
        os.fsync(dir_fd)

    try:
        return timed(create)
    finally:
        os.close(dir_fd)


def make_published_dir(path: Path) -> None:
    """mkdir, then fsync of the parent, so the workload times only the files (on the mount: the new directory is
    on the grid and linked in its parent)."""
    path.mkdir()
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


def ls_l(path: Path) -> float:
    return timed(lambda: subprocess.run(["ls", "-l", str(path)], stdout=subprocess.DEVNULL, check=True))


def tiny(i: int) -> bytes:
    """The content of entry `i` of the listed directory: a literal cap on the grid (at most 55 bytes)."""
    return f"entry {i}\n".encode()


def entry_name(i: int) -> str:
    return f"e{i:06d}"


# --- local disk ------------------------------------------------------------------------------------------------------
def run_local(root: Path, data: bytes, expected: str, small: list[bytes], entries: int) -> Results:
    results = Results()
    root.mkdir()
    big = root / BIG_FILE
    cpu0 = CpuClock([]).read()[0]
    results.seconds["write"] = sequential_write(big, data)
    results.cpu["write"] = Cpu(results.seconds["write"], CpuClock([]).read()[0] - cpu0)
    buffer = bytearray(len(data))
    drop_from_page_cache([big])
    results.seconds["cold read"] = sequential_read(big, buffer)
    assert sha256_of([buffer]) == expected, "local cold read returned different bytes"
    results.seconds["warm read"] = sequential_read(big, buffer)
    assert sha256_of([buffer]) == expected, "local warm read returned different bytes"
    del buffer

    for sync in ("each", "os.sync"):
        directory = root / f"{SMALL_DIR}-{sync}"
        make_published_dir(directory)
        cpu0 = CpuClock([]).read()[0]
        seconds = results.seconds[f"small files ({sync})"] = small_files(directory, small, sync)
        results.cpu[f"small files ({sync})"] = Cpu(seconds, CpuClock([]).read()[0] - cpu0)

    listed = root / LISTED_DIR
    listed.mkdir()
    for i in range(entries):
        (listed / entry_name(i)).write_bytes(tiny(i))
    os.sync()  # their writeback must not run during the listings
    results.seconds["ls -l cold"] = ls_l(listed)
    results.seconds["ls -l warm"] = ls_l(listed)
    return results


# --- the mount -------------------------------------------------------------------------------------------------------
def timed_with_cpu(fn: Callable[[], float], mount_pids: list[int], server_pids: list[int]) -> tuple[float, Cpu]:
    """`fn()`'s own figure (seconds), and the CPU used meanwhile by this process, the mount and the servers."""
    mount_clock, server_clock = CpuClock(mount_pids), CpuClock(server_pids)
    bench0, mount0 = mount_clock.read()
    servers0 = server_clock.read()[1]
    start = time.perf_counter()
    seconds = fn()
    wall = time.perf_counter() - start
    bench1, mount1 = mount_clock.read()
    servers1 = server_clock.read()[1]
    return seconds, Cpu(wall, bench1 - bench0, mount1 - mount0, servers1 - servers0)


async def link_listed_directory(node: NodeDirectory, entries: int) -> None:
    """A directory of `entries` literal-cap files, made in one publish and linked into the node's root."""
    now = time.time()
    metadata = update_metadata(None, None, now)
    children = {entry_name(i): child_entry(LiteralCap(tiny(i)), metadata) for i in range(entries)}
    grid = open_grid(node)
    try:
        listed = await create_directory(grid, children)
        root = as_directory(parse_cap(node.aliases()["tahoe"]))
        await modify_directory(grid, root, linker(LISTED_DIR, listed, replace_files=False))
    finally:
        await grid.aclose()


def log_problems(mount: Mount) -> list[str]:
    marks = (" ERROR ", " WARNING ", "Traceback")
    return [line for line in mount.log().splitlines() if any(mark in line for mark in marks)]


def run_mount(
    mode: str,
    cluster: StorageCluster,
    root: Path,
    data: bytes,
    expected: str,
    small: list[bytes],
    entries: int,
    encoding: tuple[int, int, int],
) -> Results:
    results = Results()
    root.mkdir()
    node_dir = cluster.create_node(root / "node", *encoding)
    node = NodeDirectory(node_dir)
    mountpoint = root / "mnt"
    server_pids = [p.process.pid for p in cluster.processes if p.process is not None]

    def mounted() -> Mount:
        return Mount(node_dir, mountpoint, split=mode == "split")

    def mount_pids(mount: Mount) -> list[int]:
        """The serving process, and the grid server in split mode."""
        assert mount.pid is not None, "no pid of the serving process"
        server = server_pid(node_dir) if mount.split else None
        assert server is not None or not mount.split, "no grid server in split mode"
        return [mount.pid] + ([server] if server is not None else [])

    def cold_mount() -> Mount:
        """After an unmount: no downloaded content in the mount's cache, no share in the servers' page cache."""
        wipe_cache(node_dir)
        drop_from_page_cache([path for i in range(len(cluster.servers)) for path in cluster.share_files(i)])
        return mounted()

    with mounted() as mount:
        write = partial(sequential_write, mountpoint / BIG_FILE, data)
        seconds, cpu = timed_with_cpu(write, mount_pids(mount), server_pids)
        results.seconds["write"], results.cpu["write"] = seconds, cpu

    buffer = bytearray(len(data))
    with cold_mount() as mount:
        results.seconds["cold read"] = sequential_read(mountpoint / BIG_FILE, buffer)
        assert sha256_of([buffer]) == expected, "cold read on the mount returned different bytes"
        results.seconds["warm read"] = sequential_read(mountpoint / BIG_FILE, buffer)
        assert sha256_of([buffer]) == expected, "warm read on the mount returned different bytes"
        del buffer

        make_published_dir(mountpoint / SMALL_DIR)
        create = partial(small_files, mountpoint / SMALL_DIR, small, "dir")
        seconds, cpu = timed_with_cpu(create, mount_pids(mount), server_pids)
        results.seconds["small files"], results.cpu["small files"] = seconds, cpu

    trio.run(link_listed_directory, node, entries)
    with cold_mount() as mount:
        results.seconds["ls -l cold"] = ls_l(mountpoint / LISTED_DIR)
        results.seconds["ls -l warm"] = ls_l(mountpoint / LISTED_DIR)
        listed = len(os.listdir(mountpoint / LISTED_DIR))
        assert listed == entries, f"the mount lists {listed} of {entries} entries"
        synced = len(os.listdir(mountpoint / SMALL_DIR))
        assert synced == len(small), f"{synced} of {len(small)} small files are there after a remount"
    results.log_problems = log_problems(mount)  # the log of all three mounts (the same file, appended to)
    return results


# --- output --------------------------------------------------------------------------------------------------------
def fs_type(path: Path) -> str:
    """The file-system type holding `path` (the longest mount point above it in /proc/mounts)."""
    path = path.resolve()
    best, kind = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            _dev, point, fstype, *_ = line.split()
            point = point.replace("\\040", " ")
            if (path == Path(point) or Path(point) in path.parents) and len(point) > len(best):
                best, kind = point, fstype
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--small-files", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10000)
    add_grid_arguments(parser)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to work (local disk)")
    parser.add_argument("--modes", default="no-split,split", help="comma-separated: no-split, split")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    unusable = fuse_unavailable()
    if unusable:
        parser.error(f"cannot mount: {unusable}")
    disk = fs_type(args.dir)
    if disk in ("tmpfs", "ramfs"):
        parser.error(f"{args.dir} is a {disk}; the baseline needs a disk (give --dir)")
    size = args.size_mib * MiB

    data = os.urandom(size)
    expected = sha256_of([data])
    small = [os.urandom(SMALL_FILE_SIZE) for _ in range(args.small_files)]
    with tempfile.TemporaryDirectory(prefix="bench-mount-", dir=args.dir) as tmp:
        root = Path(tmp)
        local = run_local(root / "local", data, expected, small, args.entries)
        with StorageCluster(root / "servers", args.servers) as cluster:
            mounts = {
                mode: run_mount(
                    mode,
                    cluster,
                    root / mode,
                    data,
                    expected,
                    small,
                    args.entries,
                    (args.needed, args.happy, args.total),
                )
                for mode in modes
            }

    n = args.small_files
    rows: list[tuple[str, str, Callable[[float], float], str, str]] = [
        # label, unit, seconds -> figure, local workload, mount workload
        (f"1 write {args.size_mib} MiB + fsync", "MB/s", lambda s: size / s / MB, "write", "write"),
        ("2 cold read", "MB/s", lambda s: size / s / MB, "cold read", "cold read"),
        ("3 warm read", "MB/s", lambda s: size / s / MB, "warm read", "warm read"),
        (f"4 {n} x 4 KiB files, local fsync each", "files/s", lambda s: n / s, "small files (each)", "small files"),
        (f"4 {n} x 4 KiB files, local os.sync", "files/s", lambda s: n / s, "small files (os.sync)", "small files"),
        (f"5 ls -l {args.entries} entries, cold", "entries/s", lambda s: args.entries / s, "ls -l cold", "ls -l cold"),
        (f"5 ls -l {args.entries} entries, warm", "entries/s", lambda s: args.entries / s, "ls -l warm", "ls -l warm"),
    ]
    print(
        f"Mounted grid vs local disk ({disk}); {args.servers} local GBS servers, k={args.needed} happy={args.happy} "
        f"N={args.total}, {os.cpu_count()} cores"
    )
    both = "split" in modes and "no-split" in modes
    header = f"  {'':40} {'local':>22}" + "".join(f" {mode:>22} {'ratio':>6}" for mode in modes)
    print(header + (f" {'split/no-split':>15}" if both else ""))
    for label, unit, figure, local_key, mount_key in rows:
        line = f"  {label:40} {figure(local.seconds[local_key]):11.1f} {unit:<10}"
        for mode in modes:
            seconds = mounts[mode].seconds[mount_key]
            ratio = figure(seconds) / figure(local.seconds[local_key])
            line += f" {figure(seconds):11.1f} {unit:<10} {ratio:6.3f}"
        if both:
            split_ratio = figure(mounts["split"].seconds[mount_key]) / figure(mounts["no-split"].seconds[mount_key])
            line += f" {split_ratio:15.3f}"
        print(line)
    print("  seconds:")
    for label, _unit, _figure, local_key, mount_key in rows:
        line = f"  {label:40} {local.seconds[local_key]:9.3f} s" + "".join(
            f"  {mode} {mounts[mode].seconds[mount_key]:9.3f} s" for mode in modes
        )
        print(line)
    print("  CPU (workloads 1 and 4):")
    cpu_rows = (("write", ["write"]), ("small files", ["small files (each)", "small files (os.sync)"]))
    for workload, local_keys in cpu_rows:
        for key in local_keys:
            print(f"  {'local ' + key:40} {local.cpu[key].describe()}")
        for mode in modes:
            print(f"  {mode + ' ' + workload:40} {mounts[mode].cpu[workload].describe()}")
    for mode in modes:
        problems = mounts[mode].log_problems
        if problems:
            print(f"  {mode}: {len(problems)} warning/error lines in the mount logs, first ones:")
            for line in problems[:10]:
                print(f"    {line[:200]}")


if __name__ == "__main__":
    main()
