"""`blackmatch check` and `deep-check` against real `blackmatch storage run` processes: five servers on loopback,
k=3 happy=5 N=10 (two shares a server).

Healthy objects of every kind; servers stopped (unhealthy but recoverable, then unrecoverable); a share corrupted
on disk that only --verify finds, with the advisory its server records; --add-lease moving lease expiry times on
disk; deep-check over a tree with a loop; --json in Tahoe's shape; exit statuses; an unreachable grid.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import trio

from lafs_core import base32
from lafs_core.caps import parse_cap
from lafs_core.grid.directory import as_directory, linker, modify_directory, resolve
from lafs_core.grid.mutable_io import create_mutable
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid
from lafs_core.storage.containers import (
    IMMUTABLE_DATA_OFFSET,
    IMMUTABLE_HEADER,
    IMMUTABLE_LEASE,
    MUTABLE_DATA_OFFSET,
    MUTABLE_HEADER,
    MUTABLE_LEASE,
    is_mutable_container,
    parse_immutable_container,
    parse_mutable_leases,
)

from .mounting import Mount, requires_fuse
from .storage_cluster import StorageCluster, blackmatch

HEALTHY, UNHEALTHY, UNRECOVERABLE, FAILED = 0, 3, 4, 1
TAHOE_RESULT_KEYS = {
    "count-happiness",
    "count-shares-good",
    "count-shares-needed",
    "count-shares-expected",
    "count-good-share-hosts",
    "count-corrupt-shares",
    "list-corrupt-shares",
    "servers-responding",
    "sharemap",
    "count-wrong-shares",
    "count-recoverable-versions",
    "count-unrecoverable-versions",
    "healthy",
    "recoverable",
}


@pytest.fixture(scope="module")
def node(cluster: StorageCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(cluster.create_node(tmp_path_factory.mktemp("client") / "node", 3, 5, 10))


def put(node: str, data: bytes, tmp_path: Path, *args: str) -> str:
    """Upload `data`; `args` are put's own (a target, --mutable)."""
    source = tmp_path / f"upload-{os.urandom(4).hex()}"
    source.write_bytes(data)
    return blackmatch("put", "-d", node, str(source), *args).stdout.decode().strip()


def check(node: str, *args: str, command: str = "check") -> tuple[int, str]:
    done = blackmatch(command, "-d", node, *args, check=False)
    assert done.returncode in (HEALTHY, UNHEALTHY, UNRECOVERABLE), done.stderr.decode()
    return done.returncode, done.stdout.decode()


def share_files_of(cluster: StorageCluster, cap: str) -> list[Path]:
    storage_index = parse_cap(cap).storage_index
    assert storage_index is not None
    name = base32.encode(storage_index)
    return [p for i in range(len(cluster.servers)) for p in cluster.share_files(i) if p.parent.name == name]


def lease_positions(path: Path) -> list[tuple[int, int]]:
    """(offset of the expiration field, expiration) of every lease in a share container file."""
    raw = path.read_bytes()
    if is_mutable_container(raw):
        slots = raw[MUTABLE_HEADER.size : MUTABLE_DATA_OFFSET]
        leases = parse_mutable_leases(slots)
        positions = [MUTABLE_HEADER.size + i * MUTABLE_LEASE.size + 4 for i in range(len(leases))]
        return [(at, lease.expiration) for at, lease in zip(positions, leases, strict=True)]
    info = parse_immutable_container(raw[: IMMUTABLE_HEADER.size], len(raw))
    leases_at = IMMUTABLE_DATA_OFFSET + info.data_length
    info = parse_immutable_container(raw[: IMMUTABLE_HEADER.size], len(raw), raw[leases_at:])
    return [
        (leases_at + i * IMMUTABLE_LEASE.size + IMMUTABLE_LEASE.size - 4, lease.expiration)
        for i, lease in enumerate(info.leases)
    ]


@pytest.mark.parametrize("kind", ["chk", "lit", "sdmf", "mdmf", "directory"])
def test_a_healthy_object_of_every_kind(node: str, tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        cap = blackmatch("mkdir", "-d", node, "--format", "mdmf").stdout.decode().strip()
    elif kind in ("sdmf", "mdmf"):
        cap = trio.run(_create_mutable, node, kind)
    else:
        cap = put(node, os.urandom(30 if kind == "lit" else 300_000), tmp_path)
    status, out = check(node, "--verify", cap)
    lines = out.splitlines()
    assert status == HEALTHY, out
    if kind == "lit":
        assert lines == ["Summary: Healthy (LIT)", " storage index: "]
        return
    assert lines[0] == "Summary: Healthy"
    assert lines[1] == f" storage index: {base32.encode(parse_cap(cap).storage_index or b'')}"
    assert lines[2:] == [
        " good-shares: 10 (encoding is 3-of-10)",
        " wrong-shares: 0",
        " good-share-hosts: 5",
        " happiness: 5",
    ]
    assert parse_cap(cap).readonly().to_string() not in out and cap not in out  # caps are never printed


async def _create_mutable(node: str, file_format: str) -> str:
    """A mutable file in the format asked for (put --mutable makes the node's default one)."""
    grid = open_grid(NodeDirectory(Path(node)))
    try:
        return str(await create_mutable(grid, os.urandom(150_000), file_format))
    finally:
        await grid.aclose()


def test_json_has_tahoes_keys(node: str, tmp_path: Path) -> None:
    cap = put(node, os.urandom(200_000), tmp_path)
    status, out = check(node, "--json", cap)
    data = json.loads(out)
    assert status == HEALTHY
    assert data["storage-index"] == base32.encode(parse_cap(cap).storage_index or b"")
    assert data["summary"] == "Healthy"
    assert set(data["results"]) == TAHOE_RESULT_KEYS
    assert sorted(data["results"]["sharemap"], key=int) == [str(n) for n in range(10)]
    assert len(data["results"]["servers-responding"]) == 5
    literal = json.loads(check(node, "--json", put(node, b"tiny", tmp_path))[1])
    assert literal == {"storage-index": "", "results": {"healthy": True}}


def test_stopped_servers_make_a_file_unhealthy_then_unrecoverable(
    all_running: StorageCluster, node: str, tmp_path: Path
) -> None:
    cap = put(node, os.urandom(400_000), tmp_path)
    all_running.stop(0)
    all_running.stop(1)
    status, out = check(node, cap)
    assert status == UNHEALTHY
    assert out.splitlines()[0] == "Summary: Not Healthy: 6 shares (enc 3-of-10)"
    assert " good-share-hosts: 3" in out.splitlines()
    all_running.stop(2)
    all_running.stop(3)
    status, out = check(node, "--json", cap)
    assert status == UNRECOVERABLE
    results = json.loads(out)["results"]
    assert (results["recoverable"], results["count-shares-good"], len(results["servers-responding"])) == (False, 2, 1)
    all_running.stop(4)
    failed = blackmatch("check", "-d", node, cap, check=False)
    assert failed.returncode == FAILED and failed.stdout == b""
    assert len(failed.stderr.decode().strip().splitlines()) == 1 and b"no storage server answered" in failed.stderr


def test_a_corrupt_share_is_found_only_by_verify_and_advised(
    cluster: StorageCluster, node: str, tmp_path: Path
) -> None:
    cap = put(node, os.urandom(1_500_000), tmp_path)
    victim = share_files_of(cluster, cap)[0]
    raw = bytearray(victim.read_bytes())
    raw[IMMUTABLE_DATA_OFFSET + 0x24 + 5000] ^= 0x01  # inside the first block
    victim.write_bytes(bytes(raw))
    status, _out = check(node, cap)
    assert status == HEALTHY
    server = next(s for s in cluster.servers if victim.is_relative_to(s.path))
    advisories = server.path / "storage" / "corruption-advisories"
    before = set(advisories.glob("*")) if advisories.exists() else set()
    status, out = check(node, "--verify", cap)
    assert status == UNHEALTHY
    lines = out.splitlines()
    assert lines[0] == "Summary: Not Healthy: 9 shares (enc 3-of-10)"
    si = victim.parent.name
    assert lines[-2:] == [" corrupt shares:", f"  server {server.server_id}, SI {si}, shnum {int(victim.name)}"]
    [advisory] = set(advisories.glob("*")) - before
    assert f"storage_index: {si}" in advisory.read_text() and f"share_number: {victim.name}" in advisory.read_text()


@pytest.mark.parametrize("mutable", [False, True])
def test_add_lease_moves_the_expiry_on_disk(cluster: StorageCluster, node: str, tmp_path: Path, mutable: bool) -> None:
    cap = put(node, os.urandom(100_000), tmp_path, *(["--mutable"] if mutable else []))
    files = share_files_of(cluster, cap)
    assert len(files) == 10
    long_ago = int(time.time()) - 1000
    for path in files:
        with open(path, "r+b") as f:
            for at, _expiration in lease_positions(path):
                f.seek(at)
                f.write(struct.pack(">L", long_ago))
    check(node, cap)
    assert {expiration for path in files for _at, expiration in lease_positions(path)} == {long_ago}
    status, _out = check(node, "--add-lease", cap)
    assert status == HEALTHY
    in_thirty_days = time.time() + 30 * 24 * 3600
    for path in files:
        expirations = [expiration for _at, expiration in lease_positions(path)]
        assert expirations and all(expiration > in_thirty_days for expiration in expirations), path


def test_deep_check_counts_each_object_once_in_a_tree_with_a_loop(node: str, tmp_path: Path) -> None:
    blackmatch("mkdir", "-d", node, "tahoe:tree/sub")
    put(node, os.urandom(80_000), tmp_path, "tahoe:tree/big")
    blackmatch("put", "-d", node, "-", "tahoe:tree/sub/small", stdin=b"small")
    blackmatch("ln", "-d", node, "tahoe:tree/big", "tahoe:tree/sub/big-again")
    trio.run(_link_loop, node)
    status, out = check(node, "--verify", "--add-lease", "tahoe:tree", command="deep-check")
    assert status == HEALTHY, out
    assert out.splitlines() == [
        "<root>: Healthy",
        "big: Healthy",
        "sub: Healthy",
        "sub/small: Healthy (LIT)",
        "done: 4 objects checked, 4 healthy, 0 unhealthy",
        " 0 unrecoverable",
    ]
    status, out = check(node, "--json", "tahoe:tree", command="deep-check")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["path"] for line in lines[:-1]] == [[], ["big"], ["sub"], ["sub", "small"]]
    assert all(line["cap"].startswith(("URI:DIR2-RO:", "URI:CHK:", "URI:LIT:")) for line in lines[:-1])
    assert lines[1]["check-results"]["results"]["healthy"] is True
    assert lines[-1] == {
        "type": "stats",
        "stats": {
            "count-objects-checked": 4,
            "count-objects-healthy": 4,
            "count-objects-unhealthy": 0,
            "count-objects-unrecoverable": 0,
            "count-corrupt-shares": 0,
            "count-directories-unlisted": 0,
        },
    }


async def _link_loop(node: str) -> None:
    """tree/sub/up is tree itself (the CLI refuses to make loops; a Tahoe grid may have them all the same)."""
    directory = NodeDirectory(Path(node))
    grid = open_grid(directory)
    try:
        root = parse_cap(directory.aliases()["tahoe"])
        tree, _ = await resolve(grid, root, ["tree"])
        sub, _ = await resolve(grid, root, ["tree", "sub"])
        await modify_directory(grid, as_directory(sub), linker("up", tree, replace_files=False))
    finally:
        await grid.aclose()


def test_deep_check_reports_unhealthy_objects(all_running: StorageCluster, node: str, tmp_path: Path) -> None:
    blackmatch("mkdir", "-d", node, "tahoe:fragile")
    put(node, os.urandom(50_000), tmp_path, "tahoe:fragile/file")
    all_running.stop(4)
    status, out = check(node, "tahoe:fragile", command="deep-check")
    assert status == UNHEALTHY
    assert out.splitlines() == [
        "<root>: Unhealthy: 8 shares (enc 3-of-10)",
        "file: Not Healthy: 8 shares (enc 3-of-10)",
        "done: 2 objects checked, 0 healthy, 2 unhealthy",
        " 0 unrecoverable",
    ]


@requires_fuse
def test_a_path_on_a_mount_is_checked_by_its_read_cap(all_running: StorageCluster, tmp_path: Path) -> None:
    node = all_running.create_node(tmp_path / "node")
    with Mount(node, tmp_path / "mnt") as mount:
        (mount.mountpoint / "uploaded").write_bytes(os.urandom(100_000))
    with Mount(node, tmp_path / "mnt") as mount:  # the unmount before uploaded everything
        uploaded = mount.mountpoint / "uploaded"
        readcap = parse_cap(os.getxattr(uploaded, "user.tahoe.readcap").decode())
        status, out = check(str(node), str(uploaded))
        assert status == HEALTHY
        storage_index = base32.encode(readcap.storage_index or b"")
        assert out.splitlines()[:2] == ["Summary: Healthy", f" storage index: {storage_index}"]
        for index in range(len(all_running.servers)):
            all_running.stop(index)  # so the next file cannot be uploaded yet
        pending = mount.mountpoint / "pending"
        pending.write_bytes(os.urandom(100_000))
        failed = blackmatch("check", "-d", str(node), str(pending), check=False)
        assert failed.returncode == FAILED and failed.stdout == b""
        message = f"{pending} is not on the grid yet: check it once its upload is done"
        assert failed.stderr.decode() == f"blackmatch: error: {message}\n"
        for index in range(len(all_running.servers)):
            all_running.restart(index)

    missing = mount.mountpoint / "missing"
    elsewhere = tmp_path / "local-file"
    elsewhere.write_bytes(b"not on the grid")
    for target, message in (
        (missing, f"{missing}: no such file or directory"),
        (elsewhere, f"{elsewhere} is not on a blackmatch mount: name it as alias:path or by its cap"),
    ):
        failed = blackmatch("check", "-d", str(node), str(target), check=False)
        assert (failed.returncode, failed.stderr.decode()) == (FAILED, f"blackmatch: error: {message}\n")
