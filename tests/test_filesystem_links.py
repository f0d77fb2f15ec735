"""Hard links at the operations level, where a publish, a full disk or a crash can be made to fall between two
steps: the names of one file never end up on two contents, and no content reaches the grid before its upload."""

from __future__ import annotations

import os

import trio

from grid_server import filesystem
from grid_server.filesystem import GridFilesystem
from grid_server.operations import ROOT_INODE, AttrChanges
from lafs_core.caps import parse_cap
from lafs_core.grid.directory import linker, modify_directory
from lafs_core.grid.mutable_io import retrieve

from .test_filesystem_ops import OPTIONS, expire_listing, grid_listing, read_file, run, write_file
from .test_filesystem_ops import node as node


def test_a_publish_during_the_first_write_keeps_the_old_content_on_the_grid(node, monkeypatch):
    """A publish whose batch was taken before the first write through a linked file made it mutable publishes the
    cap its changes recorded: the new mutable file, still empty, is no name's content before its upload."""
    real = filesystem.modify_directory
    gate: dict = {"go": None, "entered": None}

    async def gated(grid, cap, modify):
        if gate["go"] is not None and not gate["go"].is_set():
            gate["entered"].set()
            await gate["go"].wait()
        return await real(grid, cap, modify)

    monkeypatch.setattr(filesystem, "modify_directory", gated)
    content = b"old content " * 10

    async def body(fs: GridFilesystem) -> None:
        f = await write_file(fs, ROOT_INODE, "f", content)
        await fs.link(f, ROOT_INODE, "g")
        assert await fs.drain()
        gate["go"], gate["entered"] = trio.Event(), trio.Event()
        await fs.setattr(f, AttrChanges(mode=0o600), None)  # ready changes for f and g (the old CHK cap)
        await gate["entered"].wait()  # that publish has taken its batch
        fh = await fs.open(f, os.O_WRONLY)  # the first write: a new, empty, mutable file
        gate["go"].set()
        await fs.publisher.round(fs.root.directory.key)  # the publish that was running ends
        listing = await grid_listing(fs, fs.root.directory.key)
        shown = {name: listing[name].cap.to_string()[:9] for name in ("f", "g")}
        data = {}
        for name in ("f", "g"):
            cap = listing[name].cap
            if cap.to_string().startswith(("URI:SSK", "URI:MDMF")):
                data[name] = (await retrieve(fs.grid, cap))[0]
        await fs.release(fh)
        assert await fs.drain()
        assert not data, f"the grid showed {shown} holding {data} while the content was still local"

    run(node, body)


def test_a_tahoe_rewrite_of_a_linked_name_is_kept(node):
    """A Tahoe client replaces the content of one name of a linked file this mount made mutable (keeping the entry's
    metadata, as Tahoe does): the next lookup shows the client's content, not the mutable file."""
    from lafs_core.caps import LiteralCap

    async def body(fs: GridFilesystem) -> None:
        f = await write_file(fs, ROOT_INODE, "f", b"old content " * 10)
        await fs.link(f, ROOT_INODE, "g")
        fh = await fs.open(f, os.O_WRONLY)
        await fs.write(fh, 0, b"NEW")
        await fs.fsync(fh, False)
        await fs.release(fh)
        root = parse_cap(node[1])
        await modify_directory(fs.grid, root, linker("g", LiteralCap(b"tahoe wrote this"), replace_files=True))
        expire_listing(fs.root.directory)
        g = await fs.lookup(ROOT_INODE, "g")
        seen = await read_file(fs, g.inode)
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        assert seen == b"tahoe wrote this" and listing["g"].cap.to_string().startswith("URI:LIT"), (
            seen,
            listing["g"].cap.to_string()[:9],
        )

    run(node, body)


def test_a_refused_truncating_open_of_a_linked_file_keeps_the_names_together(node):
    """open(O_TRUNC) of a linked file whose journal refuses the last record (a full disk) after the file was made
    mutable: the links already recorded keep the local copy they wait for, and both names end with one content."""
    import errno as _errno

    import pytest

    from grid_server.operations import FsError

    async def body(fs: GridFilesystem) -> None:
        f = await write_file(fs, ROOT_INODE, "f", b"old content " * 10)
        await fs.link(f, ROOT_INODE, "g")
        assert await fs.drain()
        await fs.forget([(f, 2)])  # the inode and its kept copy go; looked up again, it has no copy
        f = (await fs.lookup(ROOT_INODE, "f")).inode
        assert (await fs.lookup(ROOT_INODE, "g")).inode == f
        assert fs.inodes[f].local is None
        real_copy, append = fs._writable_copy, fs.journal.append

        async def then_full(inode, truncate=False):
            local = await real_copy(inode, truncate)

            def refuse(record):
                raise OSError(_errno.ENOSPC, "full")

            fs.journal.append = refuse
            return local

        fs._writable_copy = then_full
        with pytest.raises(FsError) as caught:
            await fs.open(f, os.O_WRONLY | os.O_TRUNC)
        assert caught.value.errno == _errno.ENOSPC
        fs.journal.append = append
        fs._writable_copy = real_copy
        fs.check()  # no recorded link waits for a local copy that is gone
        await fs.setattr(f, AttrChanges(mode=0o600), None)  # a later change of the file's entries
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        assert listing["f"].cap == listing["g"].cap  # one content under both names: the truncated one
        assert await read_file(fs, (await fs.lookup(ROOT_INODE, "g")).inode) == b""

    run(node, body)


def test_a_kill_during_the_first_write_does_not_split_the_names(node, monkeypatch):
    """The first write through a linked file records every name in one journal line: a process killed before that
    line is on disk replays to both names as they were, one inode, and a write then reaches both."""
    from grid_server.filesystem import open_filesystem

    content = b"old content " * 10

    async def first() -> None:
        async with open_filesystem(node[0], node[1], OPTIONS) as fs:
            f = await write_file(fs, ROOT_INODE, "f", content)
        real = filesystem.modify_directory

        async def never(grid, cap, modify):
            await trio.sleep_forever()

        monkeypatch.setattr(filesystem, "modify_directory", never)
        with trio.CancelScope() as scope:
            async with open_filesystem(node[0], node[1], OPTIONS) as fs:
                f = (await fs.lookup(ROOT_INODE, "f")).inode
                await fs.link(f, ROOT_INODE, "g")
                await fs.open(f, os.O_WRONLY)  # the first write's open: f's and g's links, one line each
                scope.cancel()
        monkeypatch.setattr(filesystem, "modify_directory", real)

    trio.run(first)
    (journal,) = (node[0].private / "blackmatch" / "roots").glob("*/journal")
    lines = journal.read_bytes().splitlines(keepends=True)
    assert b'"name":"g"' in lines[-1] and b'"local":null' not in lines[-1]
    journal.write_bytes(b"".join(lines[:-1]))  # killed before the last line was written

    async def second(fs: GridFilesystem) -> None:
        f = await fs.lookup(ROOT_INODE, "f")
        g = await fs.lookup(ROOT_INODE, "g")
        fh = await fs.open(g.inode, os.O_WRONLY | os.O_TRUNC)
        await fs.write(fh, 0, b"written through g")
        await fs.fsync(fh, False)
        await fs.release(fh)
        assert await fs.drain()
        listing = await grid_listing(fs, node[1])
        data = {
            n: (await retrieve(fs.grid, listing[n].cap))[0]
            if "SSK" in listing[n].cap.to_string()
            else listing[n].cap.to_string()[:9]
            for n in ("f", "g")
        }
        assert f.inode == g.inode and data["f"] == data["g"], data

    run(node, second)


def test_a_rename_of_one_name_changes_the_ctime_every_name_shows(node):
    """Renaming one name of a linked file changes the file's ctime; a stat after its other name's directory is read
    again (which takes the inode's fields from that name's entry) still shows it."""

    async def body(fs: GridFilesystem) -> None:
        g = await write_file(fs, ROOT_INODE, "g", b"linked")
        await fs.link(g, ROOT_INODE, "h")
        assert await fs.drain()
        await fs.forget([(g, 2)])  # the kernel lets go: looked up again, the inode's fields come from an entry
        g = (await fs.lookup(ROOT_INODE, "g")).inode
        assert (await fs.lookup(ROOT_INODE, "h")).inode == g and fs.inodes[g].local is None
        before = (await fs.getattr(g)).ctime_ns
        await trio.sleep(0.01)
        await fs.rename(ROOT_INODE, "g", ROOT_INODE, "moved", 0)
        assert await fs.drain()
        for name in ("h", "moved"):
            expire_listing(fs.root.directory)
            attributes = await fs.lookup(ROOT_INODE, name)
            assert attributes.inode == g and attributes.ctime_ns > before, name
            assert (await fs.getattr(g)).ctime_ns == attributes.ctime_ns

    run(node, body)
