"""How long a drain (what unmount waits on) goes on: while anything moves, and no longer once nothing does.

Over real storage-server processes on loopback, so a long upload really streams and a stopped grid really refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from grid_server.filesystem import FilesystemOptions, GridFilesystem, open_filesystem
from grid_server.operations import ROOT_INODE
from lafs_core.grid.nodedir import NodeDirectory

from .storage_cluster import StorageCluster
from .test_filesystem_ops import CALLER

OPTIONS = FilesystemOptions(cache_timeout=5.0, cache_size=64 << 20)


async def write_unsynced(fs: GridFilesystem, name: str, data: bytes) -> None:
    fh, _ = await fs.create(ROOT_INODE, name, 0o644, os.O_WRONLY | os.O_CREAT, CALLER)
    for offset in range(0, len(data), 1 << 20):
        await fs.write(fh, offset, data[offset : offset + (1 << 20)])
    await fs.release(fh)


def test_a_drain_outlasts_a_long_upload_but_not_a_grid_that_is_down(cluster: StorageCluster, tmp_path: Path):
    node = NodeDirectory(cluster.create_node(tmp_path / "node"))

    async def main() -> None:
        async with open_filesystem(node, node.aliases()["tahoe"], OPTIONS) as fs:
            # 48 MiB take seconds to upload, far beyond give_up_after: stored share bytes keep the drain going
            await write_unsynced(fs, "big.bin", os.urandom(48 << 20))
            start = trio.current_time()
            assert await fs.drain(give_up_after=0.5)
            assert trio.current_time() - start > 1.0  # (or the drain proved nothing)
            assert fs.outstanding() == 0

            for index in range(len(cluster.processes)):
                cluster.stop(index)
            try:
                await write_unsynced(fs, "small.bin", os.urandom(100_000))
                start = trio.current_time()
                with trio.fail_after(60):  # failed attempts are not progress: the drain ends
                    assert not await fs.drain(give_up_after=2.0)
                assert trio.current_time() - start >= 2.0
                assert fs.outstanding() > 0
            finally:
                for index in range(len(cluster.processes)):
                    cluster.restart(index)
            assert await fs.drain(give_up_after=60)  # the grid is back: the retries go through

    trio.run(main)
