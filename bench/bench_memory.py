"""The grid server's memory after walking a big tree, against the same walk of a small one.

    .venv/bin/python -m bench.bench_memory [--directories 20000] [--small 200] [--fanout 100] [--dir DIR]

Builds two trees with the grid API on a node of its own (a local grid, one share a file: the walk is the point,
not the encoding): `--directories` directories, in groups of `--fanout` below a top directory, each holding one tiny
file, and the same with `--small` directories. The groups are immutable directories on the grid (CHK), the
directories in them literal ones (DIR2-LIT: made without a key or an upload each, so 20,000 take seconds). Each tree
is linked into the root, mounted in split mode on a fresh grid server, walked with `find` and then `ls -lR` (output
to /dev/null), and the grid server's peak resident memory (VmHWM of /proc/PID/status) is read before unmounting.
Printed: both peaks, their ratio, and the grid server's live RSS (VmRSS) after each walk.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from fuse_client.grid_commands import create_node
from lafs_core.caps import LiteralCap, parse_cap
from lafs_core.dirnode import child_entry
from lafs_core.grid.directory import as_directory, create_immutable_directory, linker, modify_directory
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid
from tests.mounting import Mount, fuse_unavailable, server_pid


async def link_tree(node: NodeDirectory, name: str, directories: int, fanout: int) -> None:
    """A tree of `directories` directories (in groups of `fanout`), each with one file, linked as `name`."""
    grid = open_grid(node)
    try:
        groups = {}
        for first in range(0, directories, fanout):
            members = {}
            for index in range(first, min(first + fanout, directories)):
                leaf = {f"f{index}": child_entry(LiteralCap(b"x"), {})}
                members[f"d{index}"] = child_entry(await create_immutable_directory(grid, leaf), {})
            groups[f"g{first // fanout}"] = child_entry(await create_immutable_directory(grid, members), {})
        top = await create_immutable_directory(grid, groups)
        root = as_directory(parse_cap(node.aliases()["tahoe"]))
        await modify_directory(grid, root, linker(name, top, replace_files=False))
    finally:
        await grid.aclose()


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of the process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def walk(node_dir: Path, mountpoint: Path, name: str) -> tuple[dict[str, int], int, float]:
    """Mount, find and ls -lR the tree; the grid server's memory, the directories found, and the seconds taken."""
    with Mount(node_dir, mountpoint, split=True):
        pid = server_pid(node_dir)
        assert pid is not None, "no grid server"
        start = time.monotonic()
        found = subprocess.run(
            ["find", str(mountpoint / name), "-type", "d"], capture_output=True, text=True, check=True
        ).stdout.count("\n")
        subprocess.run(["ls", "-lR", str(mountpoint / name)], stdout=subprocess.DEVNULL, check=True)
        seconds = time.monotonic() - start
        return memory_kib(pid), found, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directories", type=int, default=20000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--fanout", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to work")
    args = parser.parse_args()
    unusable = fuse_unavailable()
    if unusable:
        parser.error(f"cannot mount: {unusable}")
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.dir) as tmp:
        results = {}
        for count in (args.small, args.directories):
            root = Path(tmp) / str(count)
            node = create_node(root / "node", needed=1, happy=1, total=1, local_grid=1)
            trio.run(link_tree, node, "tree", count, args.fanout)
            results[count] = walk(root / "node", root / "mnt", "tree")
    print("grid server memory after find + ls -lR (split mode)")
    for count, (memory, found, seconds) in results.items():
        print(
            f"  {count:6d} directories ({found} found, {seconds:5.1f} s): "
            f"peak {memory['VmHWM'] / 1024:7.1f} MiB, after {memory['VmRSS'] / 1024:7.1f} MiB"
        )
    small, big = results[args.small][0]["VmHWM"], results[args.directories][0]["VmHWM"]
    print(f"  ratio of peaks {args.directories}/{args.small}: {big / small:.2f}")


if __name__ == "__main__":
    main()
