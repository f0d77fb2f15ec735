"""Special files (FIFOs, sockets, devices) and link counts on the mount, each case run on tmpfs too: Linux's answer
is the expectation. Then special files and link counts after an unmount, a wiped cache and a new mount.

The tmpfs of the comparison is mounted without `nodev`, and the tests run as root (CAP_MKNOD), so device nodes can
be made in both places; neither place opens one.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .mounting import MOUNT_MARKS, Mount, blackmatch, wipe_cache
from .posix_compare import Places, outcome, places_fixture, stat_fields

pytestmark = MOUNT_MARKS

places = places_fixture()

SPECIAL_FIELDS = ("kind", "mode", "nlink", "uid", "gid", "size", "rdev")
DEVICES = {"null": (stat.S_IFCHR, os.makedev(1, 3)), "disk": (stat.S_IFBLK, os.makedev(259, 70000))}


def bind_socket(path: Path) -> None:
    """Bind a Unix socket at `path` (the kernel makes its inode with mknod S_IFSOCK), then close it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))


def make_specials(root: Path) -> None:
    """One special file of each kind in `root`: fifo, sock, and the DEVICES."""
    os.mkfifo(root / "fifo", 0o640)
    bind_socket(root / "sock")
    for name, (kind, device) in DEVICES.items():
        os.mknod(root / name, kind | 0o620, device)


def special_names() -> list[str]:
    return ["fifo", "sock", *DEVICES]


def test_special_files_are_made_with_their_kind_mode_and_device(places: Places) -> None:
    def case(root: Path) -> object:
        os.umask(0o022)
        make_specials(root)
        return {name: stat_fields(root / name, *SPECIAL_FIELDS) for name in special_names()} | {
            "listing": sorted(os.listdir(root)),
            "again": outcome(os.mkfifo, root / "fifo"),
            "rdev of a fifo made by mknod": stat_fields(_made(root / "f2", stat.S_IFIFO | 0o600, 5), "rdev"),
        }

    places.same(case)


def _made(path: Path, mode: int, device: int) -> Path:
    os.mknod(path, mode, device)
    return path


def test_chmod_chown_rename_unlink_of_special_files(places: Places) -> None:
    def case(root: Path) -> object:
        make_specials(root)
        (root / "sub").mkdir()
        results: dict[str, Any] = {}
        for name in special_names():
            os.chmod(root / name, 0o604)
            os.chown(root / name, 1234, 5678, follow_symlinks=False)
            os.rename(root / name, root / "sub" / name)
            results[name] = stat_fields(root / "sub" / name, *SPECIAL_FIELDS)
        os.rename(root / "sub" / "fifo", root / "sub" / "null")  # a special over a special
        results["replaced"] = stat_fields(root / "sub" / "null", *SPECIAL_FIELDS)
        results["listing"] = sorted(os.listdir(root / "sub"))
        for name in os.listdir(root / "sub"):
            os.unlink(root / "sub" / name)
        results["emptied"] = os.listdir(root / "sub")
        return results

    places.same(case)


def test_a_hard_link_of_a_special_file_keeps_its_kind(places: Places) -> None:
    def case(root: Path) -> object:
        make_specials(root)
        results = {}
        for name in special_names():
            os.link(root / name, root / f"{name}.link")
            results[name] = stat_fields(root / f"{name}.link", "kind", "mode", "rdev", "size")
        return results

    places.same(case)


def test_a_fifo_passes_data_through_the_kernel(places: Places) -> None:
    """The kernel serves a FIFO's opens, reads and writes; the file system sees none, and its size stays 0."""

    def case(root: Path) -> object:
        os.mkfifo(root / "fifo")
        fd = os.open(root / "fifo", os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(fd, b"through the pipe")
            received = os.read(fd, 100)
            empty = outcome(os.read, fd, 100)
        finally:
            os.close(fd)
        return [
            received,
            empty,
            outcome(os.truncate, root / "fifo", 0),
            outcome(os.listxattr, root / "fifo"),
            stat_fields(root / "fifo"),
        ]

    places.same(case)


def test_tar_cp_and_rsync_copy_special_files(places: Places) -> None:
    """Copies of a tree holding special files, made by the tools that make them, into and within the place."""

    def case(root: Path) -> object:
        source = root / "source"
        source.mkdir()
        make_specials(source)
        (source / "file").write_bytes(b"content")
        commands = {
            "tar": f"tar -cf - -C {source} . | (mkdir {root}/tar && tar -xf - -C {root}/tar)",
            "cp": f"cp -a {source} {root}/cp",
            "rsync": f"rsync -a --specials --devices {source}/ {root}/rsync/",
        }
        copies: dict[str, Any] = {}
        for tool, command in commands.items():
            done = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)
            copies[tool] = [done.returncode, done.stderr] + [
                (name, stat_fields(root / tool / name, *SPECIAL_FIELDS)) for name in sorted(os.listdir(root / tool))
            ]
        return copies

    places.same(case)


def test_link_counts_of_directories(places: Places) -> None:
    def case(root: Path) -> object:
        counts: list[Any] = []

        def note() -> None:
            counts.append({name: os.stat(root / name).st_nlink for name in ("d", "e")} | {".": os.stat(root).st_nlink})

        (root / "d").mkdir()
        (root / "e").mkdir()
        note()
        for name in ("a", "b", "c"):
            (root / "d" / name).mkdir()
        (root / "d" / "file").write_bytes(b"not a directory")
        os.mkfifo(root / "d" / "fifo")
        note()
        os.rmdir(root / "d" / "a")
        note()
        os.rename(root / "d" / "b", root / "e" / "b")
        note()
        os.rename(root / "d" / "c", root / "e" / "b")  # over an empty directory: one fewer, none more
        note()
        os.rename(root / "e", root / "d" / "e")
        counts.append([os.stat(root / "d").st_nlink, os.stat(root / "d" / "e").st_nlink, os.stat(root).st_nlink])
        return counts

    places.same(case)


def test_unlinked_open_file_has_no_links(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "f").write_bytes(b"data")
        (root / "g").write_bytes(b"other")
        (root / "d").mkdir()
        f = os.open(root / "f", os.O_RDONLY)
        g = os.open(root / "g", os.O_RDONLY)
        d = os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = [os.fstat(fd).st_nlink for fd in (f, g, d)]
            os.unlink(root / "f")
            os.rename(root / "d", root / "moved")
            os.replace(root / "moved", root / "moved")  # a no-op rename keeps the name
            (root / "h").write_bytes(b"replacing")
            os.rename(root / "h", root / "g")  # g's old inode loses its only name
            os.rmdir(root / "moved")
            after = [os.fstat(fd).st_nlink for fd in (f, g, d)]
            data = os.pread(f, 10, 0)
        finally:
            for fd in (f, g, d):
                os.close(fd)
        return [before, after, data, sorted(os.listdir(root))]

    places.same(case)


def eventually(observe: Callable[[], Any], expected: Any, timeout: float = 5.0) -> Any:
    """`observe()` once it equals `expected`, polled for up to `timeout` seconds; else its last value."""
    deadline = time.monotonic() + timeout
    while (seen := observe()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def test_special_files_and_link_counts_survive_a_remount_with_a_wiped_cache(tmp_path: Path) -> None:
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint) as mount:
        tree = mount.mountpoint / "tree"
        tree.mkdir()
        make_specials(tree)
        for name in ("a", "b"):
            (tree / name).mkdir()
        os.chmod(tree / "fifo", 0o604)
        os.chown(tree / "null", 1234, 5678)
        written = {name: stat_fields(tree / name, *SPECIAL_FIELDS) for name in special_names()}
        assert written["null"]["rdev"] == DEVICES["null"][1] and written["fifo"]["kind"] == "fifo", written
        assert os.stat(tree).st_nlink == 4
    # the command line shows each kind (and a device's numbers) and refuses to get a special file's content
    listed = blackmatch("ls", "-l", "-d", str(node), "tahoe:tree")
    assert listed.returncode == 0, listed.stderr
    letters = {line.split()[-1]: line[0] for line in listed.stdout.splitlines()}
    assert letters == {"fifo": "p", "sock": "s", "null": "c", "disk": "b", "a": "d", "b": "d"}, listed.stdout
    assert " 259, 70000 " in next(line for line in listed.stdout.splitlines() if line.endswith(" disk"))
    got = blackmatch("get", "-d", str(node), "tahoe:tree/fifo", str(tmp_path / "copy"))
    assert got.returncode == 1 and got.stderr.strip().endswith("tahoe:tree/fifo is a FIFO, which has no content to get")
    assert not (tmp_path / "copy").exists()
    wipe_cache(node)
    with Mount(node, mountpoint) as mount:
        tree = mount.mountpoint / "tree"
        assert sorted(os.listdir(tree)) == sorted([*special_names(), "a", "b"])
        assert {name: stat_fields(tree / name, *SPECIAL_FIELDS) for name in special_names()} == written
        assert eventually(lambda: os.stat(tree).st_nlink, 4) == 4
        assert eventually(lambda: os.stat(mount.mountpoint).st_nlink, 3) == 3
