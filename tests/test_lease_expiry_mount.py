"""Issue 15 end to end: storage servers that expire leases, and a mount whose grid server renews them.

Four real `blackmatch storage run` processes with expiry on, a lease that lives `LEASE_LIFE` seconds unrenewed
and a crawler that starts a new pass a second after the last; a mount whose tahoe.cfg renews every few seconds at
a high rate. A file uploaded with `blackmatch put` and linked nowhere is never renewed and the crawler deletes its
shares; the mounted tree (files of several sizes, a subdirectory, a mutable file) keeps every share through a full
pass that began after the put file's lease had run out, and after unmount, a wiped cache and a new mount every file
reads byte for byte. Nothing here is timed: the test waits on the servers' state files, with a generous deadline.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from grid_server.lease_renewal import STATE_FILE
from grid_server.lease_schedule import Idle, from_json, last_result
from lafs_core import base32
from lafs_core.caps import parse_cap
from lafs_core.storage.lease_checker import load_state

from .mounting import MOUNT_MARKS, Mount, wipe_cache
from .storage_cluster import StorageCluster, blackmatch
from .test_lease_checker import configure

pytestmark = MOUNT_MARKS

LEASE_LIFE = 30  # seconds a lease lives unrenewed on these servers: ten renewal intervals
WAIT = 300.0  # seconds a condition may take before the test fails (never what makes it pass)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {WAIT:g} s"
        time.sleep(0.2)


def all_share_files(cluster: StorageCluster) -> set[Path]:
    return {path for index in range(len(cluster.servers)) for path in cluster.share_files(index)}


def passes_finished(cluster: StorageCluster) -> list[int]:
    return [load_state(server.lease_checker_state).passes_finished for server in cluster.servers]


def test_the_crawler_deletes_an_unrenewed_file_and_a_mounted_tree_survives(tmp_path: Path) -> None:
    cluster = StorageCluster(tmp_path / "grid", 4)
    for server in cluster.servers:
        configure(server.path, enabled="true", mode="age", override_lease_duration=f"{LEASE_LIFE} s", cycle_time="1 s")
    with cluster:
        node = cluster.create_node(tmp_path / "node", needed=2, happy=3, total=4)
        with open(node / "tahoe.cfg", "a", encoding="utf-8") as cfg:
            cfg.write("\n[blackmatch]\nlease.renewal_interval = 3 seconds\nlease.renewal_rate = 100\n")
        contents = {
            "empty": b"",
            "literal": b"small enough to live in its cap",
            "medium": os.urandom(70_000),
            "sub/large": os.urandom(1_500_000),
            "sub/another": os.urandom(9_000),
        }
        mutable = os.urandom(20_000)
        (tmp_path / "mutable").write_bytes(mutable)
        blackmatch("put", "-d", str(node), "--mutable", str(tmp_path / "mutable"), "tahoe:mutable")

        with Mount(node, tmp_path / "mnt") as mount:
            (mount.mountpoint / "sub").mkdir()
            for name, data in contents.items():
                with open(mount.mountpoint / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # on the grid, with its directory entry
            (tmp_path / "unrenewed").write_bytes(os.urandom(50_000))
            put = blackmatch("put", "-d", str(node), str(tmp_path / "unrenewed")).stdout.decode().strip()
            storage_index = parse_cap(put).storage_index
            assert storage_index is not None
            bucket = base32.encode(storage_index)
            shares = all_share_files(cluster)
            unrenewed = {path for path in shares if path.parent.name == bucket}
            assert len(unrenewed) == 4
            tree = shares - unrenewed

            wait_for(lambda: not unrenewed & all_share_files(cluster), "deletion of the unrenewed file's shares")
            # Every server then runs a whole pass that starts after the unrenewed file's lease ran out, when any
            # share of the tree left unrenewed since its upload (earlier) would have run out too.
            seen = passes_finished(cluster)
            wait_for(
                lambda: all(now >= then + 2 for now, then in zip(passes_finished(cluster), seen, strict=True)),
                "full crawler pass on every server",
            )
            assert all_share_files(cluster) == tree
            (state_file,) = (mount.node.state_dir / "roots").glob(f"*/{STATE_FILE}")
            last = last_result(from_json(json.loads(state_file.read_text())) or Idle(0))
            assert last is not None and (last.tally.renewed, last.tally.skipped) == (6, 2)  # 2 files are literal

        wipe_cache(node)
        with Mount(node, tmp_path / "mnt") as mount:
            for name, data in contents.items():
                assert (mount.mountpoint / name).read_bytes() == data, f"{name} differs"
            assert (mount.mountpoint / "mutable").read_bytes() == mutable
