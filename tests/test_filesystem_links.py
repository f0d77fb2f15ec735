"""Hard links at the operations level, where a publish, a full disk or a crash can be made to fall between two
steps: the names of one file never end up on two contents, and no content reaches the grid before its upload."""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from grid_server import filesystem
from grid_server.filesystem import GridFilesystem, open_filesystem
from grid_server.metadata import link_count, link_identity
from grid_server.operations import ROOT_INODE, AttrChanges
from lafs_core.caps import LiteralCap, parse_cap
from lafs_core.dirnode import DirEntry, child_entry
from lafs_core.grid.directory import linker, modify_directory, read_directory
from lafs_core.grid.mutable_io import retrieve

from .test_filesystem_ops import CALLER, OPTIONS, expire_listing, grid_listing, read_file, run, write_file
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


# --- names a change missed: the link sweep (grid_server/link_sweep.py) ------------------------------------------
async def linked_in_two_directories(fs: GridFilesystem, content: bytes, names: int = 2) -> None:
    """a/f with `names` - 1 more names in b (b/n1, b/n2, ...), all on the grid."""
    a = await fs.mkdir(ROOT_INODE, "a", 0o755, CALLER)
    b = await fs.mkdir(ROOT_INODE, "b", 0o755, CALLER)
    f = await write_file(fs, a.inode, "f", content)
    for number in range(1, names):
        await fs.link(f, b.inode, f"n{number}")
    assert await fs.drain()


async def entry(fs: GridFilesystem, *path: str) -> DirEntry:
    """The entry at `path` below the root as the grid has it now."""
    directory = parse_cap(fs.root.directory.key)
    for name in path[:-1]:
        directory = (await read_directory(fs.grid, directory))[name].cap
    return (await read_directory(fs.grid, directory))[path[-1]]


async def write_through(fs: GridFilesystem, path: tuple[str, ...], data: bytes) -> None:
    """Look up `path` (and nothing else) and write `data` over its content, fsynced."""
    inode = ROOT_INODE
    for name in path:
        inode = (await fs.lookup(inode, name)).inode
    fh = await fs.open(inode, os.O_WRONLY | os.O_TRUNC)
    await fs.write(fh, 0, data)
    await fs.fsync(fh, False)
    await fs.release(fh)


def test_a_first_write_reaches_a_name_this_mount_never_looked_up(node):
    """Linked on one run; on the next, a write through a/f alone: the walk finds b/n1 and gives it the mutable
    file's cap and f's metadata on the grid, and a later run reads the new content through it."""

    async def make(fs: GridFilesystem) -> None:
        await linked_in_two_directories(fs, b"old content " * 10)

    async def write(fs: GridFilesystem) -> None:
        await write_through(fs, ("a", "f"), b"written through a/f")
        assert await fs.drain()
        f, n1 = await entry(fs, "a", "f"), await entry(fs, "b", "n1")
        assert n1.cap == f.cap and n1.cap.to_string().startswith("URI:SSK"), n1.cap.to_string()[:9]
        assert not fs.stale_links.pending()
        kept = sorted(inode.name for inode in fs.inodes if inode is not fs.root)
        assert kept == ["a", "f"], kept  # the names the walk visited were let go once published

    async def read(fs: GridFilesystem) -> None:
        b = await fs.lookup(ROOT_INODE, "b")
        n1 = await fs.lookup(b.inode, "n1")
        assert await read_file(fs, n1.inode) == b"written through a/f" and n1.nlink == 2

    for body in (make, write, read):
        run(node, body)


def test_a_restart_in_the_middle_resumes_the_sweep(node, monkeypatch):
    """Killed after the write through a/f, before any walk: b/n1 and b/n2 still hold the old cap on the grid, and
    the journal holds the sweep. On the next run a lookup of b/n1 gives it the change at once, and the walk the
    replay starts (held back until the drain here) gives it to b/n2, which nothing looked up."""
    from grid_server import link_sweep

    async def make(fs: GridFilesystem) -> None:
        await linked_in_two_directories(fs, b"old content " * 10, names=3)

    async def killed() -> None:
        with trio.CancelScope() as scope:
            async with open_filesystem(node[0], node[1], OPTIONS) as fs:
                await write_through(fs, ("a", "f"), b"written before the kill")
                assert list(fs.stale_links.pending()) and not fs.link_sweeper.retries.failures.failing()
                assert (await entry(fs, "b", "n1")).cap.to_string().startswith("URI:CHK")
                scope.cancel()  # no drain, no walk

    async def resumed(fs: GridFilesystem) -> None:
        assert list(fs.stale_links.pending())  # replayed from the journal
        b = await fs.lookup(ROOT_INODE, "b")
        n1 = await fs.lookup(b.inode, "n1")
        assert await read_file(fs, n1.inode) == b"written before the kill" and n1.nlink == 3
        assert (await entry(fs, "b", "n2")).cap.to_string().startswith("URI:CHK")  # not walked yet
        assert await fs.drain()
        f = await entry(fs, "a", "f")
        for name in ("n1", "n2"):
            n = await entry(fs, "b", name)
            assert n.cap == f.cap and (await retrieve(fs.grid, n.cap))[0] == b"written before the kill", name

    run(node, make)
    monkeypatch.setattr(link_sweep, "SWEEP_COALESCE", math.inf)  # no walk but a drain's
    trio.run(killed)
    (journal,) = (node[0].private / "blackmatch" / "roots").glob("*/journal")
    assert b'"op":"sweep"' in journal.read_bytes()  # with the change's links, or alone after a compaction
    run(node, resumed)
    assert journal.read_bytes() == b""  # the sweep is done: compaction kept nothing


def test_a_failed_walk_is_kept_as_state_and_tried_again(node):
    """A directory that cannot be read fails the walk: the failure shows in queue_state with its error, the sweep
    stays pending, and a drain tries again (without waiting for the back-off) and finishes it."""
    from grid_server.operations import FsError

    async def make(fs: GridFilesystem) -> None:
        await linked_in_two_directories(fs, b"old content " * 10)

    async def failing(fs: GridFilesystem) -> None:
        real, failed = fs.directories.fresh, trio.Event()
        b = (await entry(fs, "b")).cap.to_string()

        async def fresh(directory):
            if directory.key == b and not failed.is_set():
                failed.set()
                raise FsError(errno.EIO, "cannot read directory: the grid is away")
            return await real(directory)

        fs.directories.fresh = fresh
        await write_through(fs, ("a", "f"), b"new")
        fs.link_sweeper.now()
        await failed.wait()
        await trio.testing.wait_all_tasks_blocked()
        state = (await fs.queue_state())["link_sweeps"]
        assert state["pending"] == 1 and len(state["failing"]) == 1, state
        (failure,) = state["failing"]
        assert "the grid is away" in failure["error"] and failure["attempts"] == 1
        assert isinstance(failure["next_try_in"], float), failure  # backing off, not given up as a bug
        assert await fs.drain()
        assert (await fs.queue_state())["link_sweeps"] == {"pending": 0, "failing": []}
        assert (await entry(fs, "b", "n1")).cap == (await entry(fs, "a", "f")).cap

    run(node, make)
    run(node, failing)


def test_removing_a_name_updates_the_count_of_names_never_looked_up(node):
    """Three names; the next run removes a/f without looking up b: b/n1 and b/n2 count two names on the grid, and
    once a run removes b/n2 without looking up n1, b/n1 is an ordinary file again (no link identity in its entry)."""

    def remove(directory: str, name: str) -> Callable[[GridFilesystem], Awaitable[None]]:
        async def body(fs: GridFilesystem) -> None:
            parent = (await fs.lookup(ROOT_INODE, directory)).inode
            await fs.unlink(parent, name)
            assert await fs.drain()

        return body

    async def make(fs: GridFilesystem) -> None:
        await linked_in_two_directories(fs, b"kept", names=3)

    async def two_left(fs: GridFilesystem) -> None:
        for name in ("n1", "n2"):
            metadata = (await entry(fs, "b", name)).metadata
            assert link_count(metadata) == 2 and link_identity(metadata) is not None, name

    async def one_left(fs: GridFilesystem) -> None:
        metadata = (await entry(fs, "b", "n1")).metadata
        assert link_identity(metadata) is None and link_count(metadata) == 1
        b = await fs.lookup(ROOT_INODE, "b")
        assert (await fs.lookup(b.inode, "n1")).nlink == 1

    for body in (make, remove("a", "f"), two_left, remove("b", "n2"), one_left):
        run(node, body)


def test_a_chmod_reaches_a_name_never_looked_up_but_not_a_later_change(node, monkeypatch):
    """chmod through a/f on a later run: b/n1 (the same cap with an older ctime) gets the change on the grid; b/n2,
    which another mount changed after the chmod but before the walk (a later ctime), keeps its own change. Which
    of the two changes n1 ends with depends on which of n1 and n2 the walk meets first (met first, n2's newer
    fields become the file's); never the mode from before the chmod."""
    from grid_server import link_sweep

    async def make(fs: GridFilesystem) -> None:
        await linked_in_two_directories(fs, b"content " * 10, names=3)

    def changed_later(children: dict) -> dict:
        old = children["n2"]
        metadata = {**old.metadata, "blackmatch": {**old.metadata["blackmatch"], "mode": 0o640}}
        metadata["blackmatch"]["ctime_ns"] = time.time_ns()
        children["n2"] = child_entry(old.cap, metadata)
        return children

    async def chmod(fs: GridFilesystem) -> None:
        a = await fs.lookup(ROOT_INODE, "a")
        f = await fs.lookup(a.inode, "f")
        await fs.setattr(f.inode, AttrChanges(mode=0o600), None)
        await modify_directory(fs.grid, (await entry(fs, "b")).cap, changed_later)
        assert await fs.drain()  # the walk, held back until now
        modes = {name: (await entry(fs, "b", name)).metadata["blackmatch"]["mode"] for name in ("n1", "n2")}
        assert modes["n2"] == 0o640 and modes["n1"] in (0o600, 0o640), modes

    run(node, make)
    monkeypatch.setattr(link_sweep, "SWEEP_COALESCE", math.inf)
    run(node, chmod)


def test_a_name_another_client_rewrote_is_left_alone(node):
    """A Tahoe client gave b/n1 content of its own (keeping the entry's metadata, as Tahoe does) before the write
    through a/f: the walk finds the identity with a cap the file never had, and leaves the client's content."""

    async def make(fs: GridFilesystem) -> None:
        await linked_in_two_directories(fs, b"old content " * 10)
        b = (await entry(fs, "b")).cap
        await modify_directory(fs.grid, b, linker("n1", LiteralCap(b"tahoe wrote this"), replace_files=True))

    async def write(fs: GridFilesystem) -> None:
        await write_through(fs, ("a", "f"), b"written through a/f")
        assert await fs.drain()
        assert (await entry(fs, "b", "n1")).cap == LiteralCap(b"tahoe wrote this")
        assert not fs.stale_links.pending()

    for body in (make, write):
        run(node, body)
