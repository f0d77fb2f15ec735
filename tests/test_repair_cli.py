"""`blackmatch check --repair` and `deep-check --repair` against real `blackmatch storage run` processes.

Five servers on loopback, k=3 happy=5 N=10. A tree of every kind (CHK, LIT, SDMF, MDMF, directories) loses two
servers for good and gains two: `deep-check --repair` makes it healthy, a second run repairs nothing, and then two
more of the original servers can stop while every file still reads byte for byte. A corrupt share found by
--verify is replaced; a file below k shares is reported unrecoverable, and a mutable file's read cap cannot
repair it. The exit status is the verdict after the repair.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lafs_core import base32
from lafs_core.caps import Cap, DirectoryCap, parse_cap
from lafs_core.dirnode import child_entry
from lafs_core.grid.directory import create_directory
from lafs_core.grid.mutable_io import create_mutable
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid
from lafs_core.grid.upload import bytes_chunks, upload_immutable
from lafs_core.storage.containers import IMMUTABLE_DATA_OFFSET, share_data

from .storage_cluster import StorageCluster, blackmatch

HEALTHY, UNHEALTHY, UNRECOVERABLE = 0, 3, 4
NEEDED, HAPPY, TOTAL = 3, 5, 10


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[StorageCluster]:
    """Five fresh servers for each test: the tests stop servers for good and add others."""
    with StorageCluster(tmp_path / "grid", 5) as running:
        yield running


def run(node: Path, *args: str) -> tuple[int, str]:
    done = blackmatch(*args[:1], "-d", str(node), *args[1:], check=False)
    assert done.returncode in (HEALTHY, UNHEALTHY, UNRECOVERABLE), done.stderr.decode()
    return done.returncode, done.stdout.decode()


async def _make_tree(node: Path, contents: dict[str, bytes]) -> DirectoryCap:
    """A directory holding one object of every kind: `contents` names -> plaintext, and a subdirectory."""
    grid = open_grid(NodeDirectory(node))
    try:
        caps: dict[str, Cap] = {
            "chk": await upload_immutable(grid, len(contents["chk"]), bytes_chunks(contents["chk"])),
            "lit": await upload_immutable(grid, len(contents["lit"]), bytes_chunks(contents["lit"])),
            "sdmf": await create_mutable(grid, contents["sdmf"], "sdmf"),
            "mdmf": await create_mutable(grid, contents["mdmf"], "mdmf"),
        }
        sub = await create_directory(grid, {"inner": child_entry(caps["chk"], {})}, "mdmf")
        return await create_directory(
            grid, {**{name: child_entry(cap, {}) for name, cap in caps.items()}, "sub": child_entry(sub, {})}
        )
    finally:
        await grid.aclose()


def test_deep_check_repair_restores_a_tree_after_servers_leave(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", NEEDED, HAPPY, TOTAL)
    contents = {
        "chk": os.urandom(700_000),
        "lit": b"small enough to live in its cap",
        "sdmf": os.urandom(40_000),
        "mdmf": os.urandom(300_000),
    }
    root = str(trio.run(_make_tree, node, contents))
    status, out = run(node, "deep-check", root)
    assert status == HEALTHY, out

    cluster.stop(0)
    cluster.stop(1)
    cluster.add()
    cluster.add()
    node = cluster.create_node(tmp_path / "node-after", NEEDED, HAPPY, TOTAL)  # lists the two gone servers too
    status, out = run(node, "deep-check", root)
    assert status == UNHEALTHY, out

    status, out = run(node, "deep-check", "--repair", root)
    lines = out.splitlines()
    assert status == HEALTHY, out
    # the root, chk, lit, mdmf, sdmf, sub (sub/inner is chk again: one object): LIT needs nothing
    assert lines[-5:] == [
        "done: 6 objects checked",
        " pre-repair: 1 healthy, 5 unhealthy",
        " 5 repairs attempted, 5 successful, 0 failed",
        " post-repair: 6 healthy, 0 unhealthy",
        " 0 unrecoverable",
    ], out
    assert out.count(" repair successful: ") == 5, out

    status, out = run(node, "deep-check", "--repair", root)
    assert status == HEALTHY and " 0 repairs attempted, 0 successful, 0 failed" in out.splitlines(), out

    cluster.stop(2)
    cluster.stop(3)
    for name, expected in contents.items():
        got = blackmatch("get", "-d", str(node), f"{root}/{name}").stdout
        assert got == expected, f"{name} differs after repair"
    assert blackmatch("get", "-d", str(node), f"{root}/sub/inner").stdout == contents["chk"]


def test_check_repair_replaces_a_corrupt_share(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", NEEDED, HAPPY, TOTAL)
    source = tmp_path / "data"
    source.write_bytes(os.urandom(1_000_000))
    cap = blackmatch("put", "-d", str(node), str(source)).stdout.decode().strip()
    si = base32.encode(parse_cap(cap).storage_index or b"")
    victim = next(p for i in range(5) for p in cluster.share_files(i) if p.parent.name == si)
    raw = bytearray(victim.read_bytes())
    raw[IMMUTABLE_DATA_OFFSET + 0x24 + 5000] ^= 0x01  # inside the first block
    victim.write_bytes(bytes(raw))

    status, out = run(node, "check", "--verify", "--repair", cap)
    lines = out.splitlines()
    assert status == HEALTHY, out
    assert lines[0] == "Summary: not healthy", out
    assert " corrupt shares:" in lines, out
    assert lines[-1].startswith(" repair successful: 1 shares placed"), out
    # the corrupt copy stays on its server (nothing can delete it), but a good copy of share 0 is elsewhere
    status, out = run(node, "check", "--verify", cap)
    assert status == HEALTHY, out
    assert share_data(victim.read_bytes()) == share_data(bytes(raw))  # only its lease was renewed
    assert blackmatch("get", "-d", str(node), cap).stdout == source.read_bytes()


def test_below_k_is_unrecoverable_and_untouched(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", NEEDED, HAPPY, TOTAL)
    source = tmp_path / "data"
    source.write_bytes(os.urandom(200_000))
    cap = blackmatch("put", "-d", str(node), str(source)).stdout.decode().strip()
    for index in range(4):  # two shares a server: one server is left with two shares, k is three
        cluster.stop(index)
    left = sorted(cluster.share_files(4))
    before = [p.read_bytes() for p in left]
    status, out = run(node, "check", "--repair", cap)
    assert status == UNRECOVERABLE, out
    assert out.splitlines()[-1].startswith(" repair failed: unrecoverable"), out
    assert sorted(cluster.share_files(4)) == left and [p.read_bytes() for p in left] == before


def test_a_read_cap_cannot_repair_a_mutable_file(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", NEEDED, HAPPY, TOTAL)
    source = tmp_path / "data"
    source.write_bytes(os.urandom(20_000))
    write_cap = blackmatch("put", "-d", str(node), "--mutable", str(source)).stdout.decode().strip()
    cluster.stop(0)
    cluster.add()
    node = cluster.create_node(tmp_path / "node-after", NEEDED, HAPPY, TOTAL)
    read_only = str(parse_cap(write_cap).readonly())
    status, out = run(node, "check", "--repair", read_only)
    assert status == UNHEALTHY, out
    assert out.splitlines()[-1] == " repair failed: repair of a mutable file or directory needs its write cap", out
    assert write_cap not in out
    status, out = run(node, "check", "--repair", write_cap)
    assert status == HEALTHY and out.splitlines()[-1].startswith(" repair successful: "), out
    assert write_cap not in out
