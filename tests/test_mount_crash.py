"""kill -9 of the mount in the middle of copying a tree, then mount again.

A copier process writes a tree of files into the mount, fsyncing every third one, and logs (on local disk) each
file whose close returned and each whose fsync returned. When the mount has taken a good part of the tree, its
serving process is killed with SIGKILL. Mounting again must resume the write-back queue: after the next unmount
(which waits for it) and a remount with the disk cache wiped, every file whose fsync returned is intact, so is
every file whose close returned (the journal recorded it before the write calls returned), every directory lists,
and nothing is left in the queue.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from .mounting import MOUNT_MARKS, Mount, kill_mount, wipe_cache
from .storage_cluster import StorageCluster, blackmatch

pytestmark = MOUNT_MARKS

FILES = 400
KILL_AFTER_CLOSED = 120

COPIER = r"""
import os, sys
source, target, log_path = sys.argv[1:4]
with open(log_path, "a", buffering=1) as log:
    for number, relative in enumerate(sorted(os.listdir(source))):
        directory = os.path.join(target, "d%d" % (number % 5))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(source, relative), "rb") as f:
            data = f.read()
        fd = os.open(os.path.join(directory, relative), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for offset in range(0, len(data), 65536):
            os.write(fd, data[offset : offset + 65536])
        if number % 3 == 0:
            os.fsync(fd)
            os.close(fd)
            log.write("synced %s\n" % relative)
        else:
            os.close(fd)
            log.write("closed %s\n" % relative)
"""


def make_source(root: Path) -> dict[str, bytes]:
    rng = random.Random(9)
    root.mkdir()
    files = {}
    for i in range(FILES):
        data = rng.randbytes(rng.choice([0, 20, 3000, 40_000, 200_000]))
        (root / f"f{i:04d}").write_bytes(data)
        files[f"f{i:04d}"] = data
    return files


def logged(log_path: Path) -> dict[str, str]:
    """file name -> "synced" or "closed", for every complete line of the copier's log."""
    lines = log_path.read_text().split("\n")[:-1] if log_path.exists() else []
    return {name: state for state, name in (line.split(" ", 1) for line in lines)}


def test_kill_9_mid_copy_then_remount(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", 3, 5, 10)
    source = tmp_path / "source"
    files = make_source(source)
    mountpoint = tmp_path / "mnt"
    log_path = tmp_path / "copied.log"
    with Mount(node, mountpoint) as mount:
        target = mount.mountpoint / "tree"
        copier = subprocess.Popen([sys.executable, "-c", COPIER, str(source), str(target), str(log_path)])
        try:
            deadline = time.monotonic() + 300
            while len(logged(log_path)) < KILL_AFTER_CLOSED:
                assert copier.poll() is None, "the copier ended before the kill"
                assert time.monotonic() < deadline, "the copy made too little progress"
                time.sleep(0.01)
            kill_mount(mount)
        finally:
            try:
                copier.wait(timeout=30)  # its next write fails once the mount is gone
            except subprocess.TimeoutExpired:
                copier.kill()
                copier.wait()
    done = logged(log_path)
    assert KILL_AFTER_CLOSED <= len(done) < FILES, "the kill did not land mid-copy"
    assert any(state == "synced" for state in done.values()) and any(state == "closed" for state in done.values())

    (journal,) = (node / "private" / "blackmatch" / "roots").glob("*/journal")
    assert b'"op":"set"' in journal.read_bytes(), "nothing was queued when the mount was killed"

    with Mount(node, mountpoint) as mount:  # resumes the queue; unmounting waits for it
        assert "resuming" in mount.log()
    assert journal.read_bytes() == b"", "changes still queued after a clean unmount"
    wipe_cache(node)

    with Mount(node, mountpoint) as mount:
        tree = mount.mountpoint / "tree"
        present = {}
        for directory in sorted(tree.iterdir()):
            for path in directory.iterdir():
                present[path.name] = path.read_bytes()
        for name in done:
            assert present.get(name) == files[name], f"{name} ({done[name]} before the kill) is not intact"
        for name, data in present.items():
            assert files[name].startswith(data), f"{name} holds bytes that were never written"
    some_synced = next(name for name, state in done.items() if state == "synced")
    number = sorted(files).index(some_synced)
    got = blackmatch("get", "-d", str(node), f"tahoe:tree/d{number % 5}/{some_synced}").stdout
    assert got == files[some_synced]
