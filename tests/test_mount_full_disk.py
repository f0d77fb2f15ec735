"""A mount whose node directory's disk runs full, as a program on the mount meets it: ENOSPC, and `rm` makes room.

The node directory's private/blackmatch (journal, files being written, cache) is a small tmpfs; the embedded grid's
shares live beside it on the ordinary disk, so the grid itself has room.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from fuse_client.grid_commands import create_node

from .mounting import MOUNT_MARKS, Mount
from .small_disk import needs_root, small_tmpfs

pytestmark = [*MOUNT_MARKS, needs_root]


def wait_for_room(path: Path, free: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (room := shutil.disk_usage(path).free) < free and time.monotonic() < deadline:
        time.sleep(0.05)
    return room


def test_a_full_disk_is_enospc_and_rm_makes_room(tmp_path: Path) -> None:
    node_dir, mountpoint = tmp_path / "node", tmp_path / "mnt"
    create_node(node_dir, needed=3, happy=5, total=10, local_grid=5)
    kept, later = os.urandom(500_000), os.urandom(300_000)
    state = node_dir / "private" / "blackmatch"
    with small_tmpfs(state, 8 << 20):
        with Mount(node_dir, mountpoint) as mount:
            (mount.mountpoint / "kept.bin").write_bytes(kept)
            big = mount.mountpoint / "big.bin"
            with pytest.raises(OSError) as full, open(big, "wb", buffering=0) as out:
                for _ in range(64):
                    out.write(os.urandom(1 << 20))
            assert full.value.errno == errno.ENOSPC
            big.unlink()  # recorded although the disk is full; the unlinked copy is dropped, not uploaded
            assert wait_for_room(state, 6 << 20) >= 6 << 20
            (mount.mountpoint / "later.bin").write_bytes(later)
            assert (mount.mountpoint / "kept.bin").read_bytes() == kept
        with Mount(node_dir, mountpoint) as mount:
            assert sorted(os.listdir(mount.mountpoint)) == ["kept.bin", "later.bin"]
            assert (mount.mountpoint / "kept.bin").read_bytes() == kept
            assert (mount.mountpoint / "later.bin").read_bytes() == later
