"""`blackmatch flush`, on real mounts in both modes over real storage-server processes.

After flush returns 0, everything is on the grid: the mount is killed with SIGKILL (no drain at unmount), every
local copy and queued change of the node directory is removed, and a new mount reads every file. With every
server stopped, flush exits 1 within its --timeout saying what stays queued and why; once the servers are back,
it returns 0.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from pathlib import Path

from fuse_client.flush_command import Progress, ProgressLine

from .mounting import MOUNT_MARKS, Mount, blackmatch, kill_mount, wipe_cache
from .storage_cluster import StorageCluster

pytestmark = MOUNT_MARKS

FLUSH_TIMEOUT = 10


def write_tree(root: Path) -> dict[str, bytes]:
    """Files of several sizes (LIT, one segment, several) in nested directories; their contents by path."""
    rng = random.Random(16)
    files = {}
    for number, size in enumerate([0, 30, 5_000, 300_000, 2_500_000, 70_000]):
        relative = f"d{number % 2}/sub{number % 3}/f{number}"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        files[relative] = rng.randbytes(size)
        path.write_bytes(files[relative])
    return files


def flush(mount: Mount, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return blackmatch("flush", str(path), *args, timeout=FLUSH_TIMEOUT + 120)


def forget_everything_local(node: Path) -> None:
    """Remove the disk cache, and each root's local copies and write-back journal: what a new mount reads then
    can only come from the grid."""
    wipe_cache(node)
    shutil.rmtree(node / "private" / "blackmatch" / "roots")


def test_flush_puts_everything_on_the_grid(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", 3, 5, 10)
    mountpoint = tmp_path / "mnt"
    with Mount(node, mountpoint) as mount:
        files = write_tree(mount.mountpoint / "tree")
        flushed = flush(mount, mount.mountpoint / "tree" / "d1")
        assert flushed.returncode == 0, flushed.stderr
        assert "is on the grid" in flushed.stdout, flushed.stdout
        assert flushed.stderr == "", "progress shown on a stream that is not a terminal"
        kill_mount(mount)  # no drain at unmount: only what flush put on the grid is there
    forget_everything_local(node)
    with Mount(node, mountpoint) as mount:
        for relative, data in files.items():
            assert (mount.mountpoint / "tree" / relative).read_bytes() == data, relative


def test_flush_with_the_grid_down_says_why(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", 3, 5, 10)
    mountpoint = tmp_path / "mnt"
    with Mount(node, mountpoint) as mount:
        try:
            with (mount.mountpoint / "waiting").open("wb") as waiting:  # created while the grid answers
                for index in range(len(cluster.processes)):
                    cluster.stop(index)
                waiting.write(b"x" * 100_000)
            failed = flush(mount, mount.mountpoint, "--timeout", str(FLUSH_TIMEOUT))
        finally:
            for index in range(len(cluster.processes)):
                cluster.restart(index)
        assert failed.returncode == 1, failed.stdout
        (reason,) = failed.stderr.splitlines()
        assert reason.startswith("blackmatch: error: ") and "still queued after 10 s" in reason, reason
        assert "upload of /waiting" in reason, reason
        flushed = flush(mount, mount.mountpoint / "waiting")  # the grid is back: it goes up now
        assert flushed.returncode == 0, flushed.stderr


def test_flush_of_a_path_off_any_mount(tmp_path: Path) -> None:
    result = blackmatch("flush", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"blackmatch: error: {tmp_path} is not on a blackmatch mount"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_redraws_in_place_on_a_terminal_only() -> None:
    progress = Progress(left=3, uploading=1, stored_bytes=0, failing=[])
    terminal, pipe = FakeTerminal(), io.StringIO()
    for stream in (terminal, pipe):
        line = ProgressLine(stream)
        line.show(progress, 3 << 19)
        line.clear()
    assert terminal.getvalue() == "\rFlushing: 3 changes left, 1.5 MiB of shares sent, 1 uploading\x1b[K\r\x1b[K"
    assert pipe.getvalue() == ""
