"""Hard-linking a tree (`cp -al`, as backup tools do) against copying it (`cp -a`), on the mount and on local disk.

    .venv/bin/python -m bench.bench_links [--files 1000] [--directories 20] [--servers 5] [--dir DIR]
                                          [--modes split,no-split]

Starts `--servers` storage servers on 127.0.0.1 (tests/storage_cluster.py) and a node using them, mounts it once per
mode, and writes a tree of `--files` files of 4 KiB random bytes (real CHK uploads) in `--directories` directories.
Then, timed, on the mount: `cp -al tree linked` and `cp -a tree copied`, each until the copy is on the grid (every
directory of the copy fsynced: its pending entries, and the uploads they wait for, done). Locally, under `--dir`,
the same two commands on the same tree, each followed by a sync of the machine. Each figure is printed next to
its baseline, `cp -a` of the same run, with the ratio link / copy: linking makes no upload and no key, so on the
mount it costs only the directory updates of the new tree and of the linked names' directories.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.mounting import MODES, Mount, fuse_unavailable
from tests.storage_cluster import StorageCluster

FILE_SIZE = 4096


def make_tree(root: Path, files: int, directories: int) -> None:
    for i in range(files):
        directory = root / f"d{i % directories:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i:05d}").write_bytes(os.urandom(FILE_SIZE))


def fsync_tree(root: Path) -> None:
    """fsync every directory of the tree: on the mount, it returns once its entries are on the grid."""
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed_cp(flags: str, source: Path, target: Path, local: bool) -> float:
    """Seconds for `cp FLAGS source target` and for the copy to be durable (on the grid, or on the local disk)."""
    start = time.perf_counter()
    subprocess.run(["cp", flags, str(source), str(target)], check=True)
    if local:
        os.sync()
    else:
        fsync_tree(target)
    return time.perf_counter() - start


def check_links(tree: Path, linked: Path, files: int) -> None:
    """The linked copy's files are the tree's, with two names each."""
    names = sorted(p.relative_to(tree) for p in tree.rglob("f*"))
    assert len(names) == files, f"the tree has {len(names)} of {files} files"
    for name in names[:: max(1, files // 50)]:
        original, link = os.stat(tree / name), os.stat(linked / name)
        assert (original.st_ino, original.st_nlink) == (link.st_ino, 2), f"{name} is not linked"


def run(root: Path, files: int, directories: int, local: bool) -> dict[str, float]:
    make_tree(root / "tree", files, directories)
    fsync_tree(root / "tree")
    if local:
        os.sync()
    seconds = {
        "cp -al": timed_cp("-al", root / "tree", root / "linked", local),
        "cp -a": timed_cp("-a", root / "tree", root / "copied", local),
    }
    check_links(root / "tree", root / "linked", files)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--directories", type=int, default=20)
    parser.add_argument("--servers", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the local tree and the cluster go")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    problem = fuse_unavailable()
    if problem:
        raise SystemExit(f"cannot mount: {problem}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-links-") as work:
        base = Path(work)
        figures = {"local disk": run(base / "local", args.files, args.directories, local=True)}
        with StorageCluster(base / "cluster", args.servers) as cluster:
            for mode in args.modes.split(","):
                node = cluster.create_node(base / f"node-{mode}", 3, min(5, args.servers), 10)
                with Mount(node, base / f"mnt-{mode}", split=mode == "split") as mount:
                    figures[f"mount, {mode}"] = run(mount.mountpoint, args.files, args.directories, local=False)
    print(f"{args.files} files of {FILE_SIZE} bytes in {args.directories} directories; {args.servers} servers")
    for place, seconds in figures.items():
        link, copy = seconds["cp -al"], seconds["cp -a"]
        print(f"{place:>16}: cp -al {link:7.2f} s   cp -a {copy:7.2f} s   link / copy {link / copy:.2f}")


if __name__ == "__main__":
    main()
