"""The command line against real `blackmatch storage run` processes: five servers on loopback, k=3 happy=5 N=10.

Files of 0 B to tens of MiB go up and come back; a file stays readable with N-k shares gone (servers stopped, share
files deleted) or corrupted on disk; an upload that cannot reach happiness fails and prints no cap; a server that
presents another TLS key than its NURL pins is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
from pathlib import Path

import pytest
import trio
import yaml

from lafs_core import base32
from lafs_core.caps import parse_cap
from lafs_core.grid.gbs_client import GbsStorageServer
from lafs_core.grid.server_api import ServerIdentityError
from lafs_core.storage.containers import IMMUTABLE_DATA_OFFSET
from lafs_core.storage.server_dir import create_server_dir

from .storage_cluster import StorageCluster, blackmatch

MiB = 1024 * 1024
NEEDED, HAPPY, TOTAL = 3, 5, 10


@pytest.fixture(scope="module")
def node(cluster: StorageCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(cluster.create_node(tmp_path_factory.mktemp("client") / "node", NEEDED, HAPPY, TOTAL))


def put(node: str, data: bytes, tmp_path: Path, *target: str) -> str:
    source = tmp_path / f"upload-{hashlib.sha256(data).hexdigest()[:12]}"
    source.write_bytes(data)
    return blackmatch("put", "-d", node, str(source), *target).stdout.decode().strip()


def get(node: str, source: str) -> bytes:
    return blackmatch("get", "-d", node, source).stdout


def storage_index_shares(cluster: StorageCluster, cap: str) -> list[Path]:
    """Every share file of the cap's storage index, on every server."""
    name = base32.encode(parse_cap(cap).storage_index)
    return [path for i in range(len(cluster.servers)) for path in cluster.share_files(i) if path.parent.name == name]


@pytest.mark.parametrize("size", [0, 1, 55, 56, 4096, MiB + 1, 24 * MiB + 12345])
def test_put_get_roundtrip(node: str, tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    cap = put(node, data, tmp_path)
    assert cap.startswith("URI:LIT:" if size <= 55 else "URI:CHK:")
    assert get(node, cap) == data


def test_shares_spread_over_every_server(cluster: StorageCluster, node: str, tmp_path: Path) -> None:
    cap = put(node, os.urandom(100_000), tmp_path)
    shares = storage_index_shares(cluster, cap)
    assert sorted(int(p.name) for p in shares) == list(range(TOTAL))
    holders = {p.parents[3] for p in shares}
    assert len(holders) == 5


def test_readable_with_any_two_servers_stopped_out_of_five(all_running: StorageCluster, node: str, tmp_path: Path):
    """Two stopped servers take four of the ten shares; each pair of the five still leaves k shares or more."""
    cluster = all_running
    data = os.urandom(3 * MiB + 7)
    cap = put(node, data, tmp_path)
    for pair in itertools.combinations(range(5), 2):
        for index in pair:
            cluster.stop(index)
        assert get(node, cap) == data, f"unreadable with servers {pair} stopped"
        for index in pair:
            cluster.restart(index)


def test_readable_with_n_minus_k_shares_deleted(cluster: StorageCluster, node: str, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 3)
    cap = put(node, data, tmp_path)
    shares = storage_index_shares(cluster, cap)
    rng = random.Random(7)
    for _ in range(3):
        survivors = set(rng.sample(shares, NEEDED))
        removed = {path: path.read_bytes() for path in shares if path not in survivors}
        for path in removed:
            path.unlink()
        try:
            assert get(node, cap) == data
        finally:
            for path, content in removed.items():
                path.write_bytes(content)
    survivors = rng.sample(shares, NEEDED - 1)
    for path in shares:
        if path not in survivors:
            path.unlink()
    failed = blackmatch("get", "-d", node, cap, check=False)
    assert failed.returncode == 1 and failed.stdout == b""
    assert b"share" in failed.stderr


def test_readable_with_n_minus_k_shares_corrupted(cluster: StorageCluster, node: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    cap = put(node, data, tmp_path)
    shares = storage_index_shares(cluster, cap)
    corrupted = random.Random(11).sample(shares, TOTAL - NEEDED)
    for path in corrupted:
        raw = bytearray(path.read_bytes())
        raw[IMMUTABLE_DATA_OFFSET + 0x24 + 1000] ^= 0x40  # inside the first block of the share's data
        path.write_bytes(raw)
    assert get(node, cap) == data
    advisory_dirs = [server.path / "storage" / "corruption-advisories" for server in cluster.servers]
    advisories = [p for directory in advisory_dirs for p in directory.glob("*")]
    assert advisories, "a share that failed verification must be reported to its server"


def test_unhappy_upload_fails_and_prints_no_cap(all_running: StorageCluster, node: str, tmp_path: Path) -> None:
    all_running.stop(2)
    source = tmp_path / "unhappy"
    source.write_bytes(os.urandom(200_000))
    failed = blackmatch("put", "-d", node, str(source), "tahoe:unhappy", check=False)
    assert failed.returncode == 1
    assert failed.stdout == b""
    assert b"happiness" in failed.stderr and b"need 5" in failed.stderr
    assert b"unhappy" not in blackmatch("ls", "-d", node, "tahoe:").stdout
    # Small files are LIT caps that need no server: they still work.
    assert get(node, put(node, b"tiny", tmp_path)) == b"tiny"


def test_server_with_wrong_tls_key_is_refused(all_running: StorageCluster, node: str, tmp_path: Path) -> None:
    cluster = all_running
    data = os.urandom(500_000)
    cap = put(node, data, tmp_path)
    victim = cluster.servers[0]
    pem = victim.path / "private" / "node.pem"
    original = pem.read_bytes()
    impostor = create_server_dir(tmp_path / "impostor")
    cluster.stop(0)
    try:
        shutil.copyfile(impostor.path / "private" / "node.pem", pem)
        cluster.restart(0)
        entry = yaml.safe_load((victim.path / "servers.yaml").read_text())["storage"][victim.server_id]

        async def ask() -> None:
            client = GbsStorageServer.from_announcement(victim.server_id, entry["ann"])
            try:
                with pytest.raises(ServerIdentityError):
                    await client.get_version()
            finally:
                await client.aclose()

        trio.run(ask)
        source = tmp_path / "refused"
        source.write_bytes(os.urandom(300_000))
        failed = blackmatch("put", "-d", node, str(source), check=False)
        assert failed.returncode == 1 and failed.stdout == b""
        assert b"happiness" in failed.stderr and b"TLS key does not match" in failed.stderr
        assert get(node, cap) == data  # the other four servers still hold enough shares
        incoming = victim.path / "storage" / "shares" / "incoming"
        assert not incoming.exists() or not any(incoming.iterdir())
    finally:
        cluster.stop(0)
        pem.write_bytes(original)
    cluster.restart(0)
    assert get(node, cap) == data


def test_directories_over_the_cluster(node: str, tmp_path: Path) -> None:
    blackmatch("mkdir", "-d", node, "tahoe:docs")
    blackmatch("mkdir", "-d", node, "tahoe:docs/deeper")
    data = os.urandom(70_000)
    cap = put(node, data, tmp_path, "tahoe:docs/deeper/report.bin")
    assert get(node, "tahoe:docs/deeper/report.bin") == data
    blackmatch("mv", "-d", node, "tahoe:docs/deeper/report.bin", "tahoe:docs/final.bin")
    assert blackmatch("ls", "-d", node, "tahoe:docs").stdout.decode().split() == ["deeper", "final.bin"]
    assert blackmatch("ls", "-d", node, "tahoe:docs/deeper").stdout == b""
    blackmatch("ln", "-d", node, "tahoe:docs/final.bin", "tahoe:docs/copy.bin")
    assert get(node, "tahoe:docs/copy.bin") == data
    blackmatch("rm", "-d", node, "tahoe:docs/final.bin")
    assert blackmatch("ls", "-d", node, "tahoe:docs").stdout.decode().split() == ["copy.bin", "deeper"]
    assert get(node, cap) == data


def test_ln_takes_a_bare_cap_as_source(node: str, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    cap = put(node, data, tmp_path)
    blackmatch("ln", "-d", node, cap, "tahoe:by-cap.bin")
    assert get(node, "tahoe:by-cap.bin") == data
    moved = blackmatch("mv", "-d", node, cap, "tahoe:elsewhere.bin", check=False)
    assert moved.returncode == 1 and b"nothing to move" in moved.stderr
