"""How long a drain (what unmount waits on) goes on: while anything moves, and no longer once nothing does.

Over real storage-server processes on loopback, so a long upload really streams and a stopped grid really refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from grid_server.filesystem import DRAIN_AGAIN, DRAIN_CHECK, open_filesystem
from grid_server.operations import ROOT_INODE
from lafs_core.grid.nodedir import NodeDirectory

from .storage_cluster import StorageCluster
from .test_filesystem_ops import OPTIONS, write_file

QUIET = 3 * DRAIN_CHECK  # give_up_after: a few of the drain's looks, so one slow second on a busy machine is fine


def test_a_drain_outlasts_a_long_upload_but_not_a_grid_that_is_down(cluster: StorageCluster, tmp_path: Path):
    node = NodeDirectory(cluster.create_node(tmp_path / "node"))

    async def main() -> None:
        async with open_filesystem(node, node.aliases()["tahoe"], OPTIONS) as fs:
            # 192 MiB take several times QUIET to upload (about 30 MB/s here): stored share bytes keep it going
            await write_file(fs, ROOT_INODE, "big.bin", os.urandom(192 << 20), sync=False)
            start = trio.current_time()
            assert await fs.drain(give_up_after=QUIET)
            assert trio.current_time() - start > QUIET  # (or the drain proved nothing)
            assert fs.outstanding() == 0

            for index in range(len(cluster.processes)):
                cluster.stop(index)
            try:
                await write_file(fs, ROOT_INODE, "small.bin", os.urandom(100_000), sync=False)
                start = trio.current_time()
                with trio.fail_after(60):  # failed attempts are not progress: the drain ends
                    assert not await fs.drain(give_up_after=QUIET)
                assert trio.current_time() - start >= QUIET
                assert fs.outstanding() > 0
                start = trio.current_time()  # the next drain (the grid server's, after the mount's) starts here
                assert not await fs.drain()
                assert trio.current_time() - start < DRAIN_AGAIN + 3 * DRAIN_CHECK  # not DRAIN_GIVE_UP again
            finally:
                for index in range(len(cluster.processes)):
                    cluster.restart(index)
            assert await fs.drain(give_up_after=60)  # the grid is back: the retries go through

    trio.run(main)
