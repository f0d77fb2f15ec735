"""GridFilesystem driven through the operations interface, without FUSE, over a node's embedded local grid.

These check the semantics the mount relies on: entries appear at once and reach the grid in batches, fsync waits
for the grid, renames and removals, attributes kept in metadata, xattrs with caps, and the write-back journal
resuming what a killed process left.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import json
import math
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fuse_client.grid_commands import create_node
from grid_server import directory_views, filesystem, uploader
from grid_server.filesystem import FilesystemOptions, GridFilesystem, open_filesystem
from grid_server.journal_records import Link
from grid_server.lease_renewal import STATE_FILE as RENEWAL_STATE_FILE
from grid_server.nodes import Directory, Inode
from grid_server.operations import RENAME_NOREPLACE, ROOT_INODE, AttrChanges, Caller, FsError
from grid_server.root_entry import ROOT_FILE
from lafs_core.caps import LiteralCap, parse_cap
from lafs_core.dirnode import child_entry
from lafs_core.errors import NotEnoughSharesError
from lafs_core.grid.directory import create_immutable_directory, linker, modify_directory, read_directory
from lafs_core.grid.download import read_immutable
from lafs_core.grid.mutable_io import create_mutable, retrieve
from lafs_core.grid.nodedir import NodeDirectory

from .grid_helpers import share_files
from .small_disk import fill_up, needs_root, small_tmpfs

CALLER = Caller(os.getuid(), os.getgid(), 0o022)
OPTIONS = FilesystemOptions(cache_timeout=0.5, cache_size=64 << 20)


@pytest.fixture(autouse=True)
def checked_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every filesystem a test opens has a consistent write-back state when it closes."""
    close = GridFilesystem.close

    def check_then_close(fs: GridFilesystem) -> None:
        fs.check()
        close(fs)

    monkeypatch.setattr(GridFilesystem, "close", check_then_close)


@pytest.fixture
def node(tmp_path: Path) -> tuple[NodeDirectory, str]:
    node = create_node(tmp_path / "node", needed=3, happy=5, total=10, local_grid=5)
    return node, node.aliases()["tahoe"]


def run(node: tuple[NodeDirectory, str], body: Callable[[GridFilesystem], Awaitable[None]]) -> None:
    async def main() -> None:
        async with open_filesystem(node[0], node[1], OPTIONS) as fs:
            await body(fs)

    trio.run(main)


async def grid_listing(fs: GridFilesystem, cap: str) -> dict:
    return await read_directory(fs.grid, parse_cap(cap))  # type: ignore[arg-type]


def expire_listing(directory: Directory | None) -> None:
    """Make the directory's listing older than any cache timeout, so the next call re-reads it from the grid. Not
    by setting the read time to 0: the monotonic clock counts from boot, and on a machine up for less than the
    timeout a listing read at time 0 is still fresh."""
    assert directory is not None
    directory.fetched_at = -math.inf


async def write_file(fs: GridFilesystem, parent: int, name: str, data: bytes, sync: bool = True) -> int:
    fh, attributes = await fs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, CALLER)
    for offset in range(0, len(data), 128 * 1024):
        await fs.write(fh, offset, data[offset : offset + 128 * 1024])
    if sync:
        await fs.fsync(fh, False)
    await fs.release(fh)
    return attributes.inode


async def read_file(fs: GridFilesystem, inode: int) -> bytes:
    fh = await fs.open(inode, os.O_RDONLY)
    size = (await fs.getattr(inode)).size
    data = await fs.read(fh, 0, size + 10)
    await fs.release(fh)
    return data


def test_create_write_fsync_reaches_the_grid(node):
    data = os.urandom(3 * 1024 * 1024 + 5)

    async def body(fs: GridFilesystem) -> None:
        inode = await write_file(fs, ROOT_INODE, "big.bin", data)
        await write_file(fs, ROOT_INODE, "small.txt", b"hello", sync=True)
        listing = await grid_listing(fs, node[1])
        assert set(listing) == {"big.bin", "small.txt"}
        assert await read_immutable(fs.grid, listing["big.bin"].cap) == data  # type: ignore[arg-type]
        assert listing["small.txt"].cap.to_string().startswith("URI:LIT:")
        attributes = await fs.getattr(inode)
        assert attributes.size == len(data) and stat.S_ISREG(attributes.mode) and attributes.mode & 0o777 == 0o644
        assert await read_file(fs, inode) == data
        cap = await fs.getxattr(inode, "user.tahoe.cap")
        assert cap.decode() == listing["big.bin"].cap.to_string()
        assert (await fs.getxattr(inode, "user.tahoe.readcap")).startswith(b"URI:CHK:")
        small = (await fs.lookup(ROOT_INODE, "small.txt")).inode
        # The kernel forgets them: the local copies go, reads come from the grid.
        await fs.forget([(inode, 1), (small, 2)])
        assert inode not in fs.inodes, fs.inodes.get(inode)
        assert not any(fs.local_files.directory.iterdir())
        again = await fs.lookup(ROOT_INODE, "big.bin")
        assert again.inode != inode and await read_file(fs, again.inode) == data
        fh = await fs.open(again.inode, os.O_RDONLY)
        assert await fs.read(fh, 1_500_000, 100) == data[1_500_000:1_500_100]
        await fs.release(fh)

    run(node, body)


def test_directories_rename_unlink_and_errors(node):
    async def body(fs: GridFilesystem) -> None:
        sub = await fs.mkdir(ROOT_INODE, "sub", 0o755, CALLER)
        assert stat.S_ISDIR(sub.mode)
        await write_file(fs, sub.inode, "a", b"first", sync=False)
        await write_file(fs, ROOT_INODE, "b", b"second", sync=False)
        with pytest.raises(FsError) as caught:
            await fs.rename(ROOT_INODE, "b", sub.inode, "a", RENAME_NOREPLACE)
        assert caught.value.errno == errno.EEXIST
        await fs.rename(ROOT_INODE, "b", sub.inode, "a", 0)
        with pytest.raises(FsError) as caught:
            await fs.rmdir(ROOT_INODE, "sub")
        assert caught.value.errno == errno.ENOTEMPTY
        with pytest.raises(FsError) as caught:
            await fs.rename(ROOT_INODE, "sub", sub.inode, "loop", 0)
        assert caught.value.errno == errno.EINVAL
        moved = await fs.lookup(sub.inode, "a")
        assert await read_file(fs, moved.inode) == b"second"
        with pytest.raises(FsError) as caught:
            await fs.lookup(ROOT_INODE, "b")
        assert caught.value.errno == errno.ENOENT
        assert await fs.drain()
        root = await grid_listing(fs, node[1])
        assert set(root) == {"sub"}
        inner = await grid_listing(fs, root["sub"].cap.to_string())
        assert set(inner) == {"a"}
        await fs.unlink(sub.inode, "a")
        await fs.rmdir(ROOT_INODE, "sub")
        assert await fs.drain()
        assert await grid_listing(fs, node[1]) == {}

    run(node, body)


def test_attributes_and_xattrs_live_in_metadata(node):
    async def body(fs: GridFilesystem) -> None:
        inode = await write_file(fs, ROOT_INODE, "f", b"x" * 100)
        await fs.setattr(inode, AttrChanges(mode=0o600, mtime_ns=1_500_000_000_123_456_789), None)
        await fs.setxattr(inode, "user.color", b"blue", 0)
        link = await fs.symlink(ROOT_INODE, "l", "f" * 80, CALLER)
        assert await fs.drain()
        fs.directories[node[1]].listing = None  # forget what we know: read it back from the grid
        again = await fs.lookup(ROOT_INODE, "f")
        assert again.mode & 0o777 == 0o600 and again.mtime_ns == 1_500_000_000_123_456_789
        assert await fs.getxattr(again.inode, "user.color") == b"blue"
        assert await fs.listxattr(again.inode) == ["user.color"]  # caps are not listed: copies never carry them
        cap = await fs.getxattr(again.inode, "user.tahoe.cap")
        await fs.setxattr(again.inode, "user.tahoe.cap", cap, 0)  # the cap it has: a no-op
        for change in (
            lambda: fs.setxattr(again.inode, "user.tahoe.cap", b"URI:LIT:", 0),
            lambda: fs.setxattr(again.inode, "user.tahoe.readcap", b"URI:LIT:", 0),
            lambda: fs.removexattr(again.inode, "user.tahoe.cap"),
        ):
            with pytest.raises(FsError) as refused:
                await change()
            assert refused.value.errno == errno.EPERM
        assert await fs.getxattr(again.inode, "user.tahoe.cap") == cap
        assert stat.S_ISLNK(link.mode) and await fs.readlink(link.inode) == "f" * 80
        await fs.setattr(again.inode, AttrChanges(size=10), None)
        assert (await fs.getattr(again.inode)).size == 10

    run(node, body)


def test_a_directorys_times_reach_its_parent_once_a_publish(node, monkeypatch):
    """Names made in a directory change its mtime at once; its entry in its parent is re-recorded once per publish
    of its changes, not once per name, and the times on the grid are the ones stat showed."""
    recorded: list[str] = []
    published: list[str] = []

    async def body(fs: GridFilesystem) -> None:
        sub = await fs.mkdir(ROOT_INODE, "sub", 0o755, CALLER)
        assert await fs.drain()
        new_link = fs._new_link  # every entry recorded, alone or with others

        def counting(directory: Directory, name: str, inode: Inode) -> Link:
            recorded.append(name)
            return new_link(directory, name, inode)

        publish = fs._publish

        async def counted(directory: Directory, ready: dict) -> None:
            published.append(directory.inode.name if directory.inode else "?")
            await publish(directory, ready)

        monkeypatch.setattr(fs, "_new_link", counting)
        monkeypatch.setattr(fs, "_publish", counted)
        for i in range(20):
            await fs.mknod(sub.inode, f"f{i}", stat.S_IFREG | 0o644, 0, CALLER)
        changed = await fs.getattr(sub.inode)
        assert changed.mtime_ns == changed.ctime_ns > sub.mtime_ns and changed.atime_ns == sub.atime_ns
        assert await fs.drain()
        assert recorded.count("sub") == published.count("sub") < 5 and len(recorded) == 20 + published.count("sub")
        on_grid = (await grid_listing(fs, node[1]))["sub"].metadata["blackmatch"]
        assert (on_grid["atime_ns"], on_grid["mtime_ns"], on_grid["ctime_ns"]) == (
            changed.atime_ns,
            changed.mtime_ns,
            changed.ctime_ns,
        )

    run(node, body)


def test_a_directory_loop_is_a_symlink_to_the_ancestor(node):
    """An entry linking its own directory or an ancestor (Tahoe allows it: another client may make one) is shown
    as a symlink to that ancestor, also when it links it by its read-only cap: the kernel refuses a directory inode
    below itself, and find must meet a finite tree. Moved where it closes no loop, it is a directory again; a
    directory cannot be moved below itself however it is reached."""

    async def body(fs: GridFilesystem) -> None:
        d = await fs.mkdir(ROOT_INODE, "d", 0o755, CALLER)
        e = await fs.mkdir(d.inode, "e", 0o755, CALLER)
        assert await fs.drain()
        d_cap, e_cap = [parse_cap((await fs.getxattr(i.inode, "user.tahoe.cap")).decode()) for i in (d, e)]
        await modify_directory(fs.grid, d_cap, linker("self", d_cap, replace_files=False))  # type: ignore[arg-type]
        await modify_directory(fs.grid, e_cap, linker("up", d_cap.readonly(), replace_files=False))  # type: ignore[arg-type]
        for cap in (d_cap, e_cap):
            expire_listing(fs.directories[cap.to_string()])
        for parent, name, target in ((d.inode, "self", "."), (e.inode, "up", "..")):
            loop = await fs.lookup(parent, name)
            assert stat.S_ISLNK(loop.mode) and loop.size == len(target) and await fs.readlink(loop.inode) == target
        fh = await fs.opendir(d.inode)
        assert [(entry.name, stat.S_IFMT(entry.attributes.mode)) for entry in await fs.readdir(fh, 0)] == [
            (".", stat.S_IFDIR),
            ("..", stat.S_IFDIR),
            ("e", stat.S_IFDIR),
            ("self", stat.S_IFLNK),
        ]
        await fs.releasedir(fh)
        with pytest.raises(FsError) as refused:
            await fs.rename(ROOT_INODE, "d", e.inode, "d", 0)
        assert refused.value.errno == errno.EINVAL
        await fs.rename(e.inode, "up", ROOT_INODE, "d-again", 0)
        await fs.unlink(d.inode, "self")
        assert await fs.drain()
        again = await fs.lookup(ROOT_INODE, "d-again")
        assert stat.S_ISDIR(again.mode) and again.mode & 0o777 == 0o555  # linked read-only, by another client
        assert set(await grid_listing(fs, d_cap.to_string())) == {"e"}
        assert await grid_listing(fs, e_cap.to_string()) == {}

    run(node, body)


def test_mknod_makes_regular_files(node):
    """tar --xattrs makes each file that has attributes with mknod before it writes it."""

    async def body(fs: GridFilesystem) -> None:
        made = await fs.mknod(ROOT_INODE, "empty", stat.S_IFREG | 0o640, 0, CALLER)
        assert stat.S_ISREG(made.mode) and made.mode & 0o777 == 0o640 and made.size == 0
        fh = await fs.open(made.inode, os.O_WRONLY)
        await fs.write(fh, 0, b"filled")
        await fs.release(fh)
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        assert set(listing) == {"empty"}
        assert listing["empty"].metadata["blackmatch"]["mode"] == 0o640
        assert "special" not in listing["empty"].metadata["blackmatch"]
        assert await read_immutable(fs.grid, listing["empty"].cap) == b"filled"  # type: ignore[arg-type]

    run(node, body)


SPECIALS = {
    "fifo": (stat.S_IFIFO, 0),
    "socket": (stat.S_IFSOCK, 0),
    "char": (stat.S_IFCHR, os.makedev(1, 3)),
    "block": (stat.S_IFBLK, os.makedev(259, 70000)),
}


def test_special_files_are_empty_lit_entries_with_their_kind_in_metadata(node):
    """FIFOs, sockets and devices: the kind and device numbers in the entry's `blackmatch` metadata, an empty LIT
    cap (a Tahoe client sees an empty file). Their content can be neither read nor written through the operations
    (the kernel opens them itself), chmod keeps the kind, and they come back the same from the grid."""

    async def body(fs: GridFilesystem) -> None:
        for name, (file_type, rdev) in SPECIALS.items():
            made = await fs.mknod(ROOT_INODE, name, file_type | 0o640, rdev, CALLER)
            assert (stat.S_IFMT(made.mode), made.mode & 0o7777, made.rdev, made.size) == (file_type, 0o640, rdev, 0)
            for flags in (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC):
                with pytest.raises(FsError) as refused:
                    await fs.open(made.inode, flags)
                assert refused.value.errno == errno.ENXIO
            with pytest.raises(FsError) as refused:
                await fs.setattr(made.inode, AttrChanges(size=3), None)
            assert refused.value.errno == errno.EINVAL
            changed = await fs.setattr(made.inode, AttrChanges(mode=0o604), None)
            assert (changed.mode, changed.rdev) == (file_type | 0o604, rdev)
        with pytest.raises(FsError) as refused:
            await fs.mknod(ROOT_INODE, "dir", stat.S_IFDIR | 0o755, 0, CALLER)
        assert refused.value.errno == errno.EINVAL
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        assert set(listing) == set(SPECIALS)
        for name, (_file_type, rdev) in SPECIALS.items():
            assert listing[name].cap == LiteralCap(b"")
            ours = listing[name].metadata["blackmatch"]
            assert ours["special"] == name and ours["mode"] == 0o604
            assert ours.get("device") == ([os.major(rdev), os.minor(rdev)] if rdev else None)
            expire_listing(fs.root.directory)
            again = await fs.lookup(ROOT_INODE, name)
            assert (again.mode, again.rdev) == (SPECIALS[name][0] | 0o604, rdev)

    run(node, body)


def test_a_special_entry_given_content_elsewhere_is_a_regular_file(node):
    """A client that replaces an entry's cap but keeps its metadata (Tahoe does) makes a FIFO's entry a file."""

    async def body(fs: GridFilesystem) -> None:
        await fs.mknod(ROOT_INODE, "fifo", stat.S_IFIFO | 0o644, 0, CALLER)
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        await modify_directory(
            fs.grid,
            parse_cap(node[1]),  # type: ignore[arg-type]
            linker("fifo", LiteralCap(b"content"), replace_files=True, metadata=listing["fifo"].metadata),
        )
        expire_listing(fs.root.directory)
        seen = await fs.lookup(ROOT_INODE, "fifo")
        assert (stat.S_IFMT(seen.mode), seen.size, seen.rdev) == (stat.S_IFREG, 7, 0)

    run(node, body)


def test_link_counts(node):
    """A directory has 2 links plus one per subdirectory, pending or published, and 1 ("unknown") until its
    listing is read; a file has 1, and 0 once unlinked while open."""

    async def body(fs: GridFilesystem) -> None:
        top = await fs.mkdir(ROOT_INODE, "top", 0o755, CALLER)
        for name in ("a", "b"):
            await fs.mkdir(top.inode, name, 0o755, CALLER)
        assert (await fs.getattr(top.inode)).nlink == 4  # pending
        assert await fs.drain()
        fh, file = await fs.create(top.inode, "f", 0o644, os.O_WRONLY | os.O_CREAT, CALLER)
        assert (await fs.getattr(top.inode)).nlink == 4  # published, and a file is no subdirectory
        await fs.rename(top.inode, "b", ROOT_INODE, "b", 0)
        assert [(await fs.getattr(inode)).nlink for inode in (top.inode, ROOT_INODE)] == [3, 4]
        assert (await fs.getattr(file.inode)).nlink == 1
        await fs.unlink(top.inode, "f")
        assert (await fs.getattr(file.inode)).nlink == 0
        await fs.release(fh)

    async def after_restart(fs: GridFilesystem) -> None:
        top = await fs.lookup(ROOT_INODE, "top")
        assert top.nlink == 1  # its listing is not read yet
        await fs.releasedir(await fs.opendir(top.inode))
        assert (await fs.getattr(top.inode)).nlink == 3

    run(node, body)
    run(node, after_restart)


def test_readdir_offsets_are_stable(node):
    async def body(fs: GridFilesystem) -> None:
        names = [f"file-{i:04d}" for i in range(1200)]
        for name in names:
            await write_file(fs, ROOT_INODE, name, name.encode(), sync=False)
        fh = await fs.opendir(ROOT_INODE)
        seen, offset = [], 0
        while entries := await fs.readdir(fh, offset):
            seen += [e.name for e in entries]
            offset = entries[-1].next_offset
        await fs.releasedir(fh)
        assert seen == [".", "..", *names]
        assert await fs.drain()
        assert len(await grid_listing(fs, node[1])) == 1200

    run(node, body)


@pytest.mark.parametrize("layout", ["roots", "top level"])
def test_journal_resumes_what_a_killed_process_left(node, layout):
    """The queue a killed process left is uploaded by the next start; also from the layout before roots had their
    own directories (journal and local files at the top of private/blackmatch), which moves into the root."""
    data = os.urandom(500_000)

    async def interrupted() -> None:
        with trio.CancelScope() as scope:
            async with open_filesystem(node[0], node[1], OPTIONS) as fs:
                await write_file(fs, ROOT_INODE, "pending.bin", data, sync=False)
                # Stop the upload workers and publishers before they run: as if the process were killed now.
                scope.cancel()

    trio.run(interrupted)
    (journal,) = (node[0].private / "blackmatch" / "roots").glob("*/journal")
    assert journal.stat().st_size > 0
    if layout == "top level":
        state = node[0].private / "blackmatch"
        for name in ("journal", "files"):
            (journal.parent / name).rename(state / name)
        for kept_by_later_versions in (ROOT_FILE, RENEWAL_STATE_FILE):  # root metadata, lease renewal
            (journal.parent / kept_by_later_versions).unlink(missing_ok=True)
        journal.parent.rmdir()

    async def body(fs: GridFilesystem) -> None:
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        assert await read_immutable(fs.grid, listing["pending.bin"].cap) == data  # type: ignore[arg-type]

    run(node, body)


def test_a_journal_as_earlier_versions_wrote_it_replays(node):
    """Journal lines as the versions before typed records wrote them (a journal left by an upgraded server): a
    link waiting for local content, one whose content was uploaded, one published, and a removal."""

    async def before(fs: GridFilesystem) -> None:
        for name in ("kept", "gone", "published"):
            await write_file(fs, ROOT_INODE, name, name.encode())

    run(node, before)
    (journal,) = (node[0].private / "blackmatch" / "roots").glob("*/journal")
    (journal.parent / "files" / "c0ffee").write_bytes(b"local content")
    root = parse_cap(node[1]).to_string()
    meta = {"blackmatch": {"mode": 0o600}}
    lines = [
        {"op": "set", "seq": 1, "dir": root, "name": "local", "kind": "file", "meta": meta, "cap": None,
         "local": "c0ffee"},
        {"op": "set", "seq": 2, "dir": root, "name": "uploaded", "kind": "file", "meta": {}, "cap": None,
         "local": "f00d"},
        {"op": "uploaded", "local": "f00d", "cap": "URI:LIT:nbswy3dp"},
        {"op": "set", "seq": 3, "dir": root, "name": "gone"},
        {"op": "set", "seq": 4, "dir": root, "name": "published", "kind": "file", "meta": {}, "cap": "URI:LIT:",
         "local": None},
        {"op": "published", "seqs": [4]},
    ]  # fmt: skip
    journal.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))

    async def after(fs: GridFilesystem) -> None:
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        assert set(listing) == {"kept", "published", "local", "uploaded"}
        assert await read_immutable(fs.grid, listing["local"].cap) == b"local content"  # type: ignore[arg-type]
        assert listing["local"].metadata["blackmatch"]["mode"] == 0o600
        assert listing["uploaded"].cap.to_string() == "URI:LIT:nbswy3dp"
        assert listing["published"].cap.to_string() != "URI:LIT:"  # published already: not published again

    run(node, after)


def test_rewriting_immutable_files(node):
    async def body(fs: GridFilesystem) -> None:
        inode = await write_file(fs, ROOT_INODE, "f", b"hello\n")
        attributes = await fs.getattr(inode)
        assert attributes.mode & 0o200
        fh = await fs.open(inode, os.O_WRONLY | os.O_APPEND)
        await fs.write(fh, attributes.size, b"more\n")
        await fs.release(fh)
        assert await read_file(fs, inode) == b"hello\nmore\n"
        before = time.time_ns()
        fh = await fs.open(inode, os.O_RDWR)
        await fs.write(fh, 2, b"XY")
        written = (await fs.getattr(inode)).mtime_ns
        assert written >= before
        await fs.fsync(fh, False)
        await fs.release(fh)
        listing = await grid_listing(fs, node[1])
        assert listing["f"].metadata["blackmatch"]["mtime_ns"] == written  # the write's time reached the grid
        assert await read_immutable(fs.grid, listing["f"].cap) == b"heXYo\nmore\n"  # type: ignore[arg-type]
        await fs.setattr(inode, AttrChanges(size=3), None)
        assert await read_file(fs, inode) == b"heX"

    run(node, body)


def test_a_directory_read_answered_before_a_publish_does_not_hide_its_names(node, monkeypatch):
    """A listing re-read whose answers were served before a publish but arrive after it must not replace the
    newer listing the publish left: the published name would vanish until the next re-read."""
    hold: contextvars.ContextVar[trio.Event | None] = contextvars.ContextVar("hold", default=None)

    async def late_read_directory(grid, cap):
        listing = await read_directory(grid, cap)  # served now...
        release = hold.get()
        if release is not None:
            await release.wait()  # ...delivered late
        return listing

    monkeypatch.setattr(directory_views, "read_directory", late_read_directory)

    async def main() -> None:
        async with open_filesystem(node[0], node[1], FilesystemOptions(cache_timeout=3600)) as fs:
            parent = (await fs.mkdir(ROOT_INODE, "dir", 0o755, CALLER)).inode
            await write_file(fs, parent, "a", os.urandom(1000))
            release = trio.Event()

            async def late_reread() -> None:
                hold.set(release)
                with pytest.raises(FsError):
                    await fs.lookup(parent, "absent")  # stale: re-reads the listing, answers held

            async with trio.open_nursery() as nursery:
                fs.options = dataclasses.replace(fs.options, cache_timeout=0)
                nursery.start_soon(late_reread)
                await trio.sleep(0.2)  # the re-read is done, its answer held
                fs.options = dataclasses.replace(fs.options, cache_timeout=3600)
                await write_file(fs, parent, "b", os.urandom(1000))  # published meanwhile
                release.set()
            assert (await fs.lookup(parent, "b")).size == 1000
            fh = await fs.opendir(parent)
            assert [entry.name for entry in await fs.readdir(fh, 0)] == [".", "..", "a", "b"]
            await fs.releasedir(fh)

    trio.run(main)


def test_a_mutable_files_copy_is_read_again_only_after_a_grid_re_read(node, monkeypatch):
    """A mutable file's local copy caches the version read then. Our own publishes in its directory change nothing
    about it; only a re-read of the directory from the grid (which may bring another writer's version) does."""
    retrieves = 0
    original = filesystem.retrieve

    async def counting_retrieve(grid, cap):
        nonlocal retrieves
        retrieves += 1
        return await original(grid, cap)

    monkeypatch.setattr(filesystem, "retrieve", counting_retrieve)

    async def main() -> None:
        async with open_filesystem(node[0], node[1], FilesystemOptions(cache_timeout=3600)) as fs:
            cap = await create_mutable(fs.grid, b"hello mutable")
            await modify_directory(fs.grid, parse_cap(node[1]), linker("m", cap, replace_files=True))  # type: ignore[arg-type]
            expire_listing(fs.root.directory)  # the next lookup re-reads the root and finds "m"
            assert (await fs.lookup(ROOT_INODE, "m")).size == len(b"hello mutable")
            first = retrieves
            assert first >= 1
            for i in range(3):
                await write_file(fs, ROOT_INODE, f"f{i}", b"x" * 100)  # each fsync publishes the root
                await fs.lookup(ROOT_INODE, "m")
            assert retrieves == first, "our own publishes made the mutable file download again"
            expire_listing(fs.root.directory)
            await fs.lookup(ROOT_INODE, "m")
            assert retrieves == first + 1, "a re-read from the grid did not refresh the mutable file's copy"

    trio.run(main)


@needs_root
def test_a_full_disk_is_enospc_and_loses_nothing(node):
    """The node directory's disk (a 4 MiB tmpfs under private/blackmatch) runs full: writes, and copying a file
    to change it, get ENOSPC, not EIO; the journal's reserve still takes changes, so the unlink that makes room
    works; once the reserve is spent too, a create, a rename over a file and an O_TRUNC open get ENOSPC and change
    nothing. What was written before stays, the unlinked file is not uploaded, and a restart (journal replay)
    shows exactly the changes that were accepted."""
    kept, later = os.urandom(300_000), os.urandom(200_000)
    state = node[0].private / "blackmatch"
    accepted: list[str] = []

    async def full(call: Awaitable[Any]) -> None:
        with pytest.raises(FsError) as refused:
            await call
        assert refused.value.errno == errno.ENOSPC, refused.value

    async def fill(fs: GridFilesystem) -> None:
        for name, data in (("kept.bin", kept), ("later.bin", later)):
            inode = await write_file(fs, ROOT_INODE, name, data)
            await fs.forget([(inode, 1)])  # its local copy goes: changing it needs a new copy
        fh, big = await fs.create(ROOT_INODE, "big.bin", 0o644, os.O_WRONLY | os.O_CREAT, CALLER)
        with pytest.raises(FsError) as too_big:
            for offset in range(0, 64 << 20, 1 << 20):
                await fs.write(fh, offset, os.urandom(1 << 20))
        assert too_big.value.errno == errno.ENOSPC
        await fs.release(fh)
        await fs.unlink(ROOT_INODE, "big.bin")  # recorded in the reserve
        await fs.forget([(big.inode, 1)])  # the kernel lets go of it: its local copy goes, unuploaded
        assert shutil.disk_usage(state).free > 3 << 20

        fill_up(state / "filler")
        await full(fs.open((await fs.lookup(ROOT_INODE, "kept.bin")).inode, os.O_WRONLY))  # no room for a copy
        handles, refused = [], None
        for number in range(10_000):  # files held open stay pending, so the journal grows until the reserve is spent
            try:
                fh, _ = await fs.create(ROOT_INODE, f"open{number}", 0o644, os.O_WRONLY | os.O_CREAT, CALLER)
            except FsError as exc:
                refused = (f"open{number}", exc.errno)
                break
            handles.append(fh)
            accepted.append(f"open{number}")
        assert refused is not None and refused[1] == errno.ENOSPC
        assert len(accepted) > 100
        with pytest.raises(FsError) as lookup:
            await fs.lookup(ROOT_INODE, refused[0])  # refused: nothing of it was made
        assert lookup.value.errno == errno.ENOENT
        await full(fs.rename(ROOT_INODE, "kept.bin", ROOT_INODE, "later.bin", 0))
        await full(fs.open((await fs.lookup(ROOT_INODE, "later.bin")).inode, os.O_WRONLY | os.O_TRUNC))
        for name, data in (("kept.bin", kept), ("later.bin", later)):
            assert await read_file(fs, (await fs.lookup(ROOT_INODE, name)).inode) == data
        for fh in handles:
            await fs.release(fh)
        (state / "filler").unlink()
        assert await fs.drain()

    async def reopened(fs: GridFilesystem) -> None:
        names = set(await grid_listing(fs, node[1]))
        assert names == {"kept.bin", "later.bin", *accepted}
        for name, data in (("kept.bin", kept), ("later.bin", later)):
            assert await read_file(fs, (await fs.lookup(ROOT_INODE, name)).inode) == data

    with small_tmpfs(state, 4 << 20):
        run(node, fill)
        run(node, reopened)


def test_a_mutable_file_unlinked_while_open_is_still_published(node):
    """A mutable file's content belongs to its cap, which others may hold: writes to it are published even when
    this name of it is gone."""

    async def main() -> None:
        async with open_filesystem(node[0], node[1], OPTIONS) as fs:
            cap = await create_mutable(fs.grid, b"version one")
            await modify_directory(fs.grid, parse_cap(node[1]), linker("m", cap, replace_files=True))  # type: ignore[arg-type]
            expire_listing(fs.root.directory)
            inode = (await fs.lookup(ROOT_INODE, "m")).inode
            fh = await fs.open(inode, os.O_WRONLY | os.O_TRUNC)
            await fs.write(fh, 0, b"version two")
            await fs.unlink(ROOT_INODE, "m")
            await fs.release(fh)
            await fs.forget([(inode, 1)])
            assert await fs.drain()
            assert (await retrieve(fs.grid, cap))[0] == b"version two"

    trio.run(main)


def test_content_unlinked_before_its_upload_is_never_uploaded(node):
    """A file whose every name is gone before its upload starts (a temporary file, say) costs no upload, and its
    local copy goes once the last handle and lookup do; a hard link keeps the content wanted."""
    shares = node[0].path / "local-grid"

    async def body(fs: GridFilesystem) -> None:
        await write_file(fs, ROOT_INODE, "kept.bin", os.urandom(100_000))
        before = len(share_files(shares))
        assert before > 0
        fh, temporary = await fs.create(ROOT_INODE, "scratch.tmp", 0o644, os.O_RDWR | os.O_CREAT, CALLER)
        await fs.write(fh, 0, os.urandom(500_000))
        scratch_copy = fs.inodes[temporary.inode].local.path  # type: ignore[union-attr]
        fh_linked, linked = await fs.create(ROOT_INODE, "linked.tmp", 0o644, os.O_RDWR | os.O_CREAT, CALLER)
        await fs.write(fh_linked, 0, b"x" * 100_000)
        await fs.link(linked.inode, ROOT_INODE, "linked.bin")
        for name in ("scratch.tmp", "linked.tmp"):
            await fs.unlink(ROOT_INODE, name)
        for handle in (fh, fh_linked):
            await fs.release(handle)
        await fs.forget([(temporary.inode, 1), (linked.inode, 1)])
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        assert set(listing) == {"kept.bin", "linked.bin"}
        assert len(share_files(shares)) == before + 10  # linked.bin's shares only
        assert not scratch_copy.exists()

    run(node, body)


def test_failing_uploads_and_publishes_are_state_not_loops(node, monkeypatch):
    """A grid error is retried after a back-off that doubles, and shown with its error, tries and next try; a bug
    (any other error) is shown as failed and not retried on its own; a drain tries everything again."""
    failing: dict[str, BaseException | None] = {"upload": None, "publish": None}
    calls = {"upload": 0, "publish": 0}
    upload, modify = uploader.upload_immutable, filesystem.modify_directory

    async def flaky_upload(*args: Any) -> Any:
        calls["upload"] += 1
        if failing["upload"] is not None:
            raise failing["upload"]
        return await upload(*args)

    async def flaky_modify(*args: Any) -> Any:
        calls["publish"] += 1
        if failing["publish"] is not None:
            raise failing["publish"]
        return await modify(*args)

    monkeypatch.setattr(uploader, "upload_immutable", flaky_upload)
    monkeypatch.setattr(filesystem, "modify_directory", flaky_modify)

    async def body(fs: GridFilesystem) -> None:
        failing["upload"] = NotEnoughSharesError("the grid is down")
        await write_file(fs, ROOT_INODE, "big.bin", os.urandom(100_000), sync=False)
        await trio.sleep(0.5)
        (upload_state,) = (await fs.queue_state())["uploads"]["failing"]
        assert upload_state["item"] == "/big.bin" and upload_state["error"] == "the grid is down"
        assert upload_state["attempts"] == 1 and 1 < upload_state["next_try_in"] <= 2
        await trio.sleep(2.5)  # the back-off is over: tried again, and the next wait is twice as long
        (upload_state,) = (await fs.queue_state())["uploads"]["failing"]
        assert upload_state["attempts"] == 2 and 2 < upload_state["next_try_in"] <= 4

        failing["upload"], failing["publish"] = None, RuntimeError("a bug")
        assert not await fs.drain(give_up_after=1.5)  # the drain retries the upload at once; the publish fails
        state = await fs.queue_state()
        assert state["uploads"]["failing"] == [] and state["changes"] == 1
        (publish_state,) = state["publishes"]["failing"]
        assert publish_state["item"] == "/" and publish_state["error"] == "a bug"
        assert publish_state["next_try_in"].startswith("never")
        tried = calls["publish"]
        await trio.sleep(3)
        assert calls["publish"] == tried  # not retried in a loop

        failing["upload"] = RuntimeError("another bug")
        scratch = await write_file(fs, ROOT_INODE, "scratch", os.urandom(100_000), sync=False)
        await trio.sleep(0.5)
        assert [item["item"] for item in (await fs.queue_state())["uploads"]["failing"]] == ["/scratch"]
        await fs.unlink(ROOT_INODE, "scratch")
        await fs.forget([(scratch, 1)])
        assert (await fs.queue_state())["uploads"]["failing"] == []  # its content is gone: nothing to retry

        failing["upload"] = failing["publish"] = None
        assert await fs.drain()
        state = await fs.queue_state()
        renewal = state.pop("lease_renewal")  # not yet due on a new root: nothing under way
        assert renewal["enabled"] and not renewal["running"] and renewal["next_due_at"] > time.time()
        assert state == {
            "changes": 0,
            "uploads": {"waiting": 0, "in_flight": 0, "failing": []},
            "publishes": {"waiting": 0, "in_flight": 0, "failing": []},
            "link_sweeps": {"pending": 0, "failing": []},
        }
        assert set(await grid_listing(fs, node[1])) == {"big.bin"}

    run(node, body)


def test_directory_views_nothing_uses_are_let_go(node):
    """A walk of many directories (find, ls -lR) keeps the listings of the ones in use only, plus a bounded number
    of others: each directory's view goes once the kernel forgets it, and a later walk reads it again."""
    options = dataclasses.replace(OPTIONS, directory_views=4)

    async def main() -> None:
        async with open_filesystem(node[0], node[1], options) as fs:
            names = [f"d{index:02d}" for index in range(60)]
            children = {}
            for name in names:
                inner = {
                    "inner": child_entry(LiteralCap(name.encode() * 20), {})
                }  # a CHK directory, read from the grid
                children[name] = child_entry(await create_immutable_directory(fs.grid, inner), {})
            await modify_directory(fs.grid, parse_cap(node[1]), lambda _: children)  # type: ignore[arg-type]
            held = [await fs.lookup(ROOT_INODE, name) for name in names[:30]]  # more in use than the bound
            fs.check()
            await fs.forget([(directory.inode, 1) for directory in held])
            for _walk in range(2):
                expire_listing(fs.root.directory)
                for name in names:
                    directory = await fs.lookup(ROOT_INODE, name)
                    inner = await fs.lookup(directory.inode, "inner")
                    assert await read_file(fs, inner.inode) == name.encode() * 20
                    await fs.forget([(inner.inode, 1), (directory.inode, 1)])
                assert len(fs.directories) <= 4 + 16  # the bound, and the slack before views are looked at again
                fs.check()

    trio.run(main)


def test_hard_links_are_one_inode_and_a_write_through_one_name_reaches_all(node):
    """A link is one inode under both names; linking uploads nothing and makes no mutable file. The first write
    through a name makes the file mutable and every known name then holds its cap, on the grid too; a new run
    finds the one inode again by the link identity, even when the names are in different directories."""
    shares = node[0].path / "local-grid"

    async def first(fs: GridFilesystem) -> None:
        sub = await fs.mkdir(ROOT_INODE, "sub", 0o755, CALLER)
        f = await write_file(fs, ROOT_INODE, "f", b"old content " * 10)
        before = len(share_files(shares))
        g = await fs.link(f, sub.inode, "g")
        assert g.inode == f and g.nlink == 2 and (await fs.getattr(f)).nlink == 2
        assert await fs.drain()
        assert len(share_files(shares)) == before  # directory updates in place, no new object
        fh = await fs.open(g.inode, os.O_WRONLY | os.O_APPEND)
        await fs.write(fh, (await fs.getattr(f)).size, b"more")
        await fs.fsync(fh, False)
        await fs.release(fh)
        root, below = await grid_listing(fs, node[1]), await grid_listing(fs, fs.inodes[sub.inode].directory.key)
        assert root["f"].cap == below["g"].cap and root["f"].cap.to_string().startswith("URI:SSK")
        data, _map, _version = await retrieve(fs.grid, root["f"].cap)
        assert data == b"old content " * 10 + b"more"
        assert root["f"].metadata["blackmatch"]["link"] == below["g"].metadata["blackmatch"]["link"]

    async def second(fs: GridFilesystem) -> None:
        sub = await fs.lookup(ROOT_INODE, "sub")
        g = await fs.lookup(sub.inode, "g")
        fh = await fs.open(g.inode, os.O_WRONLY | os.O_TRUNC)
        await fs.write(fh, 0, b"new")
        await fs.release(fh)
        f = await fs.lookup(ROOT_INODE, "f")  # looked up after the write: the same inode, the new content
        assert f.inode == g.inode and f.nlink == 2 and await read_file(fs, f.inode) == b"new"
        await fs.rename(ROOT_INODE, "f", sub.inode, "g", 0)  # two names of one file: both stay
        assert (await fs.lookup(ROOT_INODE, "f")).inode == g.inode
        await fs.unlink(ROOT_INODE, "f")
        assert (await fs.getattr(g.inode)).nlink == 1

    async def third(fs: GridFilesystem) -> None:
        sub = await fs.lookup(ROOT_INODE, "sub")
        g = await fs.lookup(sub.inode, "g")
        assert g.nlink == 1 and await read_file(fs, g.inode) == b"new"
        assert "link" not in fs.inodes[g.inode].metadata["blackmatch"]

    for body in (first, second, third):
        run(node, body)
