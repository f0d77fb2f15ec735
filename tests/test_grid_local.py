"""Upload, download, mutable files and directories over a grid of in-process local share stores."""

import dataclasses
import os
import random

import pytest
import trio

import lafs_core.grid.directory as directory_module
from lafs_core.caps import ChkCap, DirectoryCap, LiteralCap
from lafs_core.dirnode import child_entry, pack_directory, unpack_directory
from lafs_core.errors import NotEnoughSharesError
from lafs_core.grid.directory import ExistingChildError, create_directory, modify_directory, read_directory
from lafs_core.grid.download import ImmutableFile, read_immutable
from lafs_core.grid.mutable_io import create_mutable, map_servers, overwrite, publish, retrieve, writer_keys
from lafs_core.grid.upload import UploadUnhappyError, allocate_shares, bytes_chunks, upload_immutable
from lafs_core.hashes import storage_index_hash
from lafs_core.immutable.encode import convergent_key
from lafs_core.immutable.params import ChkParameters
from lafs_core.mutable.keys import SDMF
from lafs_core.mutable.publish import UncoordinatedWriteError
from lafs_core.storage.containers import is_mutable_container

from .grid_helpers import local_grid, share_files


def run(fn, *args):
    return trio.run(fn, *args)


@pytest.mark.parametrize("size", [0, 1, 55, 56, 1024 * 1024 + 1, 5 * 1024 * 1024])
def test_put_get_sizes(tmp_path, size):
    grid = local_grid(tmp_path)
    data = random.Random(size).randbytes(size)

    async def main():
        cap = await upload_immutable(grid, size, bytes_chunks(data))
        assert isinstance(cap, LiteralCap if size <= 55 else ChkCap)
        assert await read_immutable(grid, cap) == data
        if size > 100:
            assert await read_immutable(grid, cap, 50, 99) == data[50:99]

    run(main)
    if size > 55:
        files = share_files(tmp_path)
        assert len(files) == 10
        assert len({f.parts[-5] for f in files}) == 5  # spread over all five servers


def test_survives_losing_seven_shares_and_reports_corruption(tmp_path):
    grid = local_grid(tmp_path)
    data = os.urandom(3 * 1024 * 1024)
    cap = run(upload_immutable, grid, len(data), bytes_chunks(data))
    files = sorted(share_files(tmp_path))
    for path in files[:6]:
        path.unlink()
    raw = bytearray(files[6].read_bytes())
    raw[200] ^= 0xFF  # inside the first block
    files[6].write_bytes(bytes(raw))
    assert run(read_immutable, grid, cap) == data
    advisories = list(tmp_path.glob("server-*/corruption-advisories/*"))
    assert len(advisories) == 1
    files[7].unlink()
    with pytest.raises(NotEnoughSharesError):
        run(read_immutable, grid, cap)


def test_unhappy_upload_fails_and_leaves_nothing(tmp_path):
    grid = local_grid(tmp_path, count=3)
    data = os.urandom(100_000)
    with pytest.raises(UploadUnhappyError) as info:
        run(upload_immutable, grid, len(data), bytes_chunks(data))
    assert "need 5" in str(info.value)
    assert share_files(tmp_path) == []
    assert not any(p.is_file() for p in tmp_path.glob("server-*/shares/incoming/**/*"))


def test_upload_succeeds_beside_an_abandoned_upload_of_the_same_file(tmp_path):
    """A client killed mid-upload leaves buckets that block their share numbers on those servers for a while.
    Uploading the same file again (same storage index) must place other share numbers there, still happy: here
    two servers lost their shares and hold a dead upload's buckets for them, the other three hold two each."""
    grid = local_grid(tmp_path)
    data = os.urandom(100_000)
    cap = run(upload_immutable, grid, len(data), bytes_chunks(data))
    ring = grid.permuted(cap.storage_index)
    lost = {}
    for server in ring[:2]:
        shares = sorted((tmp_path / server.server_id).glob("shares/*/*/*"))
        lost[server.server_id] = {int(p.name) for p in shares}
        for path in shares:
            path.unlink()

    async def main():
        for server in ring[:2]:
            lease = grid.lease(cap.storage_index, server)
            dead = await server.allocate_buckets(cap.storage_index, lease, os.urandom(32), lost[server.server_id], 9)
            assert dead.allocated == lost[server.server_id]
        assert await upload_immutable(grid, len(data), bytes_chunks(data)) == cap
        assert await read_immutable(grid, cap) == data

    run(main)
    holders = {f.parts[-5] for f in share_files(tmp_path)}
    assert holders == {server.server_id for server in ring}  # happiness 5 again: every server holds a share


def test_a_retry_reclaims_the_buckets_its_dead_attempt_left(tmp_path):
    """A killed upload leaves every share number in progress on every server; the same client's next attempt
    (same upload secret) aborts those buckets and uploads. Another client could not, and would be refused."""
    grid = local_grid(tmp_path)
    data = os.urandom(100_000)
    params = ChkParameters.for_size(len(data), 3, 10)
    storage_index = storage_index_hash(convergent_key(bytes_chunks(data)(), grid.convergence, params))

    async def main():
        dead = await allocate_shares(grid, storage_index, 40_000, grid.upload_secret(storage_index))
        assert len(dead.writers) == 10
        other = dataclasses.replace(grid, lease_secret=b"o" * 32)  # another client of the same servers
        with pytest.raises(UploadUnhappyError):
            await upload_immutable(other, len(data), bytes_chunks(data))
        cap = await upload_immutable(grid, len(data), bytes_chunks(data))
        assert await read_immutable(grid, cap) == data

    run(main)
    assert len(share_files(tmp_path)) == 10


def test_copy_to_streams_in_order(tmp_path):
    grid = local_grid(tmp_path)
    grid.max_segment_size = 64 * 1024
    data = os.urandom(1_000_000)
    cap = run(upload_immutable, grid, len(data), bytes_chunks(data))
    pieces = []

    async def main():
        async def sink(piece):
            pieces.append(piece)

        await ImmutableFile(grid, cap).copy_to(sink, 1000, 999_000)

    run(main)
    assert b"".join(pieces) == data[1000:999_000] and len(pieces) > 10


def test_mutable_files(tmp_path):
    grid = local_grid(tmp_path)

    async def main():
        cap = await create_mutable(grid, b"first")
        assert (await retrieve(grid, cap))[0] == b"first"
        await overwrite(grid, cap, b"second version " * 1000)
        data, _servermap, version = await retrieve(grid, cap)
        assert data == b"second version " * 1000 and version.seqnum == 2
        assert (await retrieve(grid, cap.readonly()))[0] == data
        return cap

    run(main)
    files = [p for p in share_files(tmp_path) if is_mutable_container(p.read_bytes()[:32])]
    assert len(files) == 10


def test_stale_writer_is_refused(tmp_path):
    grid = local_grid(tmp_path)

    async def main():
        cap = await create_mutable(grid, b"v1")
        stale = await map_servers(grid, cap)
        keys = await writer_keys(grid, cap, stale)
        await overwrite(grid, cap, b"v2 from someone else")
        with pytest.raises(UncoordinatedWriteError):
            await publish(grid, keys, b"v2 from a stale writer", stale, SDMF)
        assert (await retrieve(grid, cap))[0] == b"v2 from someone else"

    run(main)


def test_directory_changes_keep_concurrent_writers_entries(tmp_path, monkeypatch):
    grid = local_grid(tmp_path)
    raced = False

    async def racing_retrieve(g, cap):
        """Our read, then another writer's change lands before our write."""
        nonlocal raced
        result = await retrieve(g, cap)
        if not raced:
            raced = True
            data, servermap, _version = await retrieve(g, cap)
            children = unpack_directory(data, cap.writekey)
            children["theirs"] = child_entry("URI:LIT:", {})
            keys = await writer_keys(g, cap, servermap)
            await publish(g, keys, pack_directory(children, cap.writekey), servermap, SDMF)
        return result

    async def main():
        dircap = await create_directory(grid)
        assert isinstance(dircap, DirectoryCap) and await read_directory(grid, dircap) == {}
        calls = 0

        def add_mine(children):
            nonlocal calls
            calls += 1
            children["mine"] = child_entry("URI:LIT:nbswy3dp", {})
            return children

        monkeypatch.setattr(directory_module, "retrieve", racing_retrieve)
        await modify_directory(grid, dircap, add_mine)
        monkeypatch.undo()
        assert set(await read_directory(grid, dircap)) == {"mine", "theirs"}
        assert calls == 2  # applied again to the re-read directory after the collision

        def refuse(children):
            raise ExistingChildError("exists")

        with pytest.raises(ExistingChildError):
            await modify_directory(grid, dircap, refuse)

    run(main)
