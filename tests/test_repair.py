"""Repair of CHK files, SDMF and MDMF files and mutable directories, against real storage-server processes.

Five servers on loopback, k=3 happy=5 N=10. Two servers leave for good and two new ones join: repair restores
happiness, after which two more of the original servers can stop and every file still reads byte for byte. The
regenerated shares of a CHK file are byte-identical to the lost ones, for blackmatch's uploads and for Tahoe
1.20's. A file below k shares is reported unrecoverable and left untouched; a second repair places nothing.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import yaml

from lafs_core import base32
from lafs_core.caps import Cap, ChkCap, DirectoryCap, MutableWriteCap, parse_cap
from lafs_core.dirnode import child_entry
from lafs_core.grid.directory import create_directory, read_directory
from lafs_core.grid.download import read_immutable
from lafs_core.grid.grid import Grid, gather_per_server
from lafs_core.grid.local_client import LocalStorageServer
from lafs_core.grid.mutable_io import create_mutable, overwrite, retrieve
from lafs_core.grid.nodedir import EncodingConfig, NodeDirectory
from lafs_core.grid.repair import RepairRequiresWriteCapError, RepairResult, repair_immutable, repair_mutable
from lafs_core.grid.server_api import StorageServer
from lafs_core.grid.servers import open_grid
from lafs_core.grid.upload import bytes_chunks, upload_immutable
from lafs_core.mutable.layout import parse_share_header
from lafs_core.nurl import parse_furl
from lafs_core.storage.containers import MUTABLE_DATA_OFFSET, share_data

from .grid_helpers import local_grid, share_files
from .shared_data import SAMPLE_GRID, sample_caps, sample_convergence, sample_plaintext
from .storage_cluster import StorageCluster

NEEDED, HAPPY, TOTAL = 3, 5, 10
SMALL_SEGMENT = 64 * 1024
"""A small max segment size, so modest files have many segments."""
ANNOUNCEMENTS = SAMPLE_GRID / "announcements.yaml"

T = TypeVar("T")


@pytest.fixture(scope="module")
def node(cluster: StorageCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cluster.create_node(tmp_path_factory.mktemp("client") / "node", NEEDED, HAPPY, TOTAL)


def node_grid(node: Path) -> Grid:
    """A fresh grid of the node's servers (a node made after servers stopped still lists them)."""
    grid = open_grid(NodeDirectory(node))
    grid.max_segment_size = SMALL_SEGMENT
    return grid


def on_grid(grid: Grid, work: Callable[[Grid], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await work(grid)
        finally:
            await grid.aclose()

    return trio.run(main)


async def present_shares(grid: Grid, cap: ChkCap) -> dict[int, frozenset[str]]:
    """Share number -> servers that say they hold it (the servers that answer)."""

    async def ask(server: StorageServer) -> set[int]:
        return await server.list_immutable_shares(cap.storage_index)

    found: dict[int, set[str]] = {}
    for server_id, shnums in (await gather_per_server(grid.servers, ask, timeout=30)).items():
        for shnum in shnums if isinstance(shnums, set) else ():
            found.setdefault(shnum, set()).add(server_id)
    return {shnum: frozenset(servers) for shnum, servers in found.items()}


async def repair(grid: Grid, cap: Cap) -> RepairResult:
    if isinstance(cap, ChkCap):
        return await repair_immutable(grid, cap, await present_shares(grid, cap))
    assert isinstance(cap, MutableWriteCap | DirectoryCap)
    return await repair_mutable(grid, cap)


async def contents(grid: Grid, cap: Cap) -> object:
    """What a reader sees: the bytes of a file, the children of a directory."""
    if isinstance(cap, ChkCap):
        return await read_immutable(grid, cap)
    if isinstance(cap, DirectoryCap):
        return await read_directory(grid, cap)
    assert isinstance(cap, MutableWriteCap)
    return (await retrieve(grid, cap))[0]


def share_paths(cluster: StorageCluster, cap: Cap, servers: range | list[int] | None = None) -> dict[Path, int]:
    """Share file -> share number, of this cap's storage index on the given servers (default: all)."""
    name = base32.encode(cap.storage_index or b"")
    indexes = range(len(cluster.servers)) if servers is None else servers
    return {path: int(path.name) for i in indexes for path in cluster.share_files(i) if path.parent.name == name}


def test_repair_after_two_servers_leave_for_good(tmp_path: Path) -> None:
    """Every kind of object survives two servers leaving, a repair, and two more servers stopping."""
    with StorageCluster(tmp_path / "cluster", 5) as cluster:
        chk_many = os.urandom(10 * SMALL_SEGMENT + 1234)
        chk_one = os.urandom(40_000)

        async def store(grid: Grid) -> dict[str, tuple[Cap, object]]:
            caps: dict[str, Cap] = {
                "chk-many-segments": await upload_immutable(grid, len(chk_many), bytes_chunks(chk_many)),
                "chk-one-segment": await upload_immutable(grid, len(chk_one), bytes_chunks(chk_one)),
                "sdmf": await create_mutable(grid, os.urandom(3000), "sdmf"),
                "mdmf": await create_mutable(grid, os.urandom(300_000), "mdmf"),
            }
            caps["directory"] = await create_directory(grid, {"one": child_entry(caps["chk-one-segment"])})
            return {name: (cap, await contents(grid, cap)) for name, cap in caps.items()}

        stored = on_grid(node_grid(cluster.create_node(tmp_path / "node-before", NEEDED, HAPPY, TOTAL)), store)
        assert set(stored["directory"][1]) == {"one"}
        lost = {name: set(share_paths(cluster, cap, [0, 1]).values()) for name, (cap, _) in stored.items()}
        assert all(lost.values()), "every object had shares on the servers that leave"
        cluster.stop(0)
        cluster.stop(1)
        joined = {cluster.servers[cluster.add()].server_id, cluster.servers[cluster.add()].server_id}
        node = cluster.create_node(tmp_path / "node-after", NEEDED, HAPPY, TOTAL)  # lists the two gone too

        async def repair_all(grid: Grid) -> dict[str, RepairResult]:
            return {name: await repair(grid, cap) for name, (cap, _) in stored.items()}

        first = on_grid(node_grid(node), repair_all)
        for name, result in first.items():
            assert result.attempted and result.successful, (name, result)
            assert result.happiness_before < HAPPY <= result.happiness_after, (name, result)
            placed_on = {server for servers in result.placed.values() for server in servers}
            assert joined <= placed_on, (name, result)
            if isinstance(stored[name][1], bytes):  # what background repair paces itself by
                assert result.size == len(stored[name][1]), (name, result)
        for name in ("chk-many-segments", "chk-one-segment"):
            assert set(first[name].placed) == lost[name], "exactly the lost share numbers are regenerated"
            assert {server for servers in first[name].placed.values() for server in servers} == joined

        second = on_grid(node_grid(node), repair_all)
        for name, result in second.items():
            assert not result.attempted and result.successful and not result.placed and not result.size, (name, result)
            assert result.happiness_before >= HAPPY, (name, result)

        cluster.stop(2)
        cluster.stop(3)

        async def read_all(grid: Grid) -> dict[str, object]:
            return {name: await contents(grid, cap) for name, (cap, _) in stored.items()}

        survived = on_grid(node_grid(node), read_all)
        assert survived == {name: data for name, (_, data) in stored.items()}
        assert survived["chk-many-segments"] == chk_many


def test_regenerated_chk_shares_are_byte_identical(cluster: StorageCluster, node: Path) -> None:
    data = os.urandom(5 * SMALL_SEGMENT + 77)
    cap = on_grid(node_grid(node), lambda grid: upload_immutable(grid, len(data), bytes_chunks(data)))
    assert isinstance(cap, ChkCap)
    original = {shnum: share_data(path.read_bytes()) for path, shnum in share_paths(cluster, cap).items()}
    deleted = share_paths(cluster, cap, [1, 3])
    for path in deleted:
        path.unlink()

    result = on_grid(node_grid(node), lambda grid: repair(grid, cap))
    assert result.successful and set(result.placed) == set(deleted.values())
    now = {shnum: share_data(path.read_bytes()) for path, shnum in share_paths(cluster, cap).items()}
    assert now == original
    again = on_grid(node_grid(node), lambda grid: repair(grid, cap))
    assert not again.attempted and not again.placed
    assert on_grid(node_grid(node), lambda grid: contents(grid, cap)) == data


def test_corrupt_share_is_replaced_elsewhere_and_left_alone(cluster: StorageCluster, node: Path) -> None:
    """A corrupt share is absent from the good shares: its number is regenerated on a server without it, and the
    corrupt copy's data is not touched (asking its server for room renews its lease, nothing more)."""
    data = os.urandom(3 * SMALL_SEGMENT)
    cap = on_grid(node_grid(node), lambda grid: upload_immutable(grid, len(data), bytes_chunks(data)))
    assert isinstance(cap, ChkCap)
    corrupt_path, corrupt_shnum = sorted(share_paths(cluster, cap, [2]).items())[0]
    raw = bytearray(corrupt_path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    corrupt_path.write_bytes(raw)

    async def repair_without_corrupt(grid: Grid) -> RepairResult:
        good = await present_shares(grid, cap)
        good[corrupt_shnum] -= {cluster.servers[2].server_id}
        return await repair_immutable(grid, cap, good)

    result = on_grid(node_grid(node), repair_without_corrupt)
    assert result.successful and set(result.placed) == {corrupt_shnum}
    assert share_data(corrupt_path.read_bytes()) == share_data(bytes(raw)), "the corrupt copy is not rewritten"
    copies = [path for path, shnum in share_paths(cluster, cap).items() if shnum == corrupt_shnum]
    assert len(copies) == 2
    assert on_grid(node_grid(node), lambda grid: contents(grid, cap)) == data


@pytest.mark.parametrize("kind", ["chk", "sdmf"])
def test_below_k_shares_is_unrecoverable_and_untouched(cluster: StorageCluster, node: Path, kind: str) -> None:
    data = os.urandom(200_000)

    async def store(grid: Grid) -> Cap:
        if kind == "chk":
            return await upload_immutable(grid, len(data), bytes_chunks(data))
        return await create_mutable(grid, data, "sdmf")

    cap = on_grid(node_grid(node), store)
    paths = sorted(share_paths(cluster, cap))
    for path in random.Random(3).sample(paths, len(paths) - (NEEDED - 1)):
        path.unlink()
    left = {path: path.read_bytes() for path in share_paths(cluster, cap)}
    assert len(left) == NEEDED - 1

    result = on_grid(node_grid(node), lambda grid: repair(grid, cap))
    assert not result.successful and not result.placed
    assert result.reason.startswith("unrecoverable")
    assert {path: path.read_bytes() for path in share_paths(cluster, cap)} == left


def test_a_local_disk_error_is_a_failed_repair_not_a_crash(tmp_path: Path) -> None:
    """The contents are staged on local disk: when that fails (full, or not a directory), the repair fails with
    the reason, and nothing is written to the grid."""
    data = os.urandom(200_000)
    cap = on_grid(local_grid(tmp_path), lambda grid: upload_immutable(grid, len(data), bytes_chunks(data)))
    assert isinstance(cap, ChkCap)
    for path in share_files(tmp_path)[:4]:
        path.unlink()
    left = {path: path.read_bytes() for path in share_files(tmp_path)}
    (tmp_path / "not-a-directory").write_bytes(b"")

    async def staged_badly(grid: Grid) -> RepairResult:
        good = await present_shares(grid, cap)
        return await repair_immutable(grid, cap, good, scratch_dir=tmp_path / "not-a-directory" / "scratch")

    result = on_grid(local_grid(tmp_path), staged_badly)
    assert result.attempted and not result.successful
    assert result.reason.startswith("cannot keep the file's contents while it is repaired"), result.reason
    assert {path: path.read_bytes() for path in share_files(tmp_path)} == left


def test_read_only_cap_cannot_repair(tmp_path: Path) -> None:
    grid = local_grid(tmp_path)
    cap = on_grid(grid, lambda grid: create_mutable(grid, b"contents", "sdmf"))
    for readonly in (cap.readonly(), DirectoryCap(cap).readonly()):
        with pytest.raises(RepairRequiresWriteCapError, match="needs the write cap"):
            on_grid(local_grid(tmp_path), lambda grid, readonly=readonly: repair_mutable(grid, readonly))


def test_unrecoverable_newer_version_is_not_discarded_unless_forced(tmp_path: Path) -> None:
    """Tahoe's rule: repair republishes the best recoverable version only if no newer version would be lost."""
    cap = on_grid(local_grid(tmp_path), lambda grid: create_mutable(grid, b"version one", "sdmf"))
    first = {path: path.read_bytes() for path in share_files(tmp_path)}
    on_grid(local_grid(tmp_path), lambda grid: overwrite(grid, cap, b"version two"))
    for path, content in sorted(first.items())[: TOTAL - (NEEDED - 1)]:  # two shares of version two remain
        path.write_bytes(content)
    before = {path: path.read_bytes() for path in share_files(tmp_path)}

    refused = on_grid(local_grid(tmp_path), lambda grid: repair_mutable(grid, cap))
    assert refused.attempted and not refused.successful and "newer version" in refused.reason
    assert {path: path.read_bytes() for path in share_files(tmp_path)} == before

    forced = on_grid(local_grid(tmp_path), lambda grid: repair_mutable(grid, cap, force=True))
    assert forced.successful and sorted(forced.placed) == list(range(TOTAL))
    assert on_grid(local_grid(tmp_path), lambda grid: contents(grid, cap)) == b"version one"


def test_a_best_version_that_fails_to_read_is_not_replaced_by_an_older_one(tmp_path: Path) -> None:
    """The newest version has enough shares by their headers, but too many of its blocks are corrupt to read it:
    repair must fail, not republish the older version over it (reading falls back to the older one)."""
    cap = on_grid(local_grid(tmp_path), lambda grid: create_mutable(grid, b"version one", "sdmf"))
    first = {path: path.read_bytes() for path in share_files(tmp_path)}
    on_grid(local_grid(tmp_path), lambda grid: overwrite(grid, cap, b"version two"))
    second = sorted(share_files(tmp_path))
    for path in second[:4]:  # four shares of version one come back; six of version two stay
        path.write_bytes(first[path])
    for path in second[4:8]:  # four of those six get a corrupt block: two readable, three needed
        raw = bytearray(path.read_bytes())
        raw[MUTABLE_DATA_OFFSET + parse_share_header(bytes(raw[MUTABLE_DATA_OFFSET:])).offsets.share_data] ^= 1
        path.write_bytes(bytes(raw))
    before = {path: path.read_bytes() for path in share_files(tmp_path)}

    result = on_grid(local_grid(tmp_path), lambda grid: repair_mutable(grid, cap))
    assert result.attempted and not result.successful, result
    assert {path: path.read_bytes() for path in share_files(tmp_path)} == before


def test_files_uploaded_by_tahoe_are_repaired(tmp_path: Path) -> None:
    """Tahoe 1.20 files with the shares of two servers deleted: CHK shares (a 3-segment file, one with a tail
    segment) are regenerated byte for byte; an SDMF file is republished."""
    announcements = {entry["ann"]["nickname"]: entry["ann"] for entry in yaml.safe_load(ANNOUNCEMENTS.read_text())}
    names = sorted(announcements)
    for name in names:
        shutil.copytree(SAMPLE_GRID / "servers" / name, tmp_path / name)

    def grid() -> Grid:
        """The five share trees as local servers with the real servers' TubIDs (write enablers derive from
        them) and permutation seeds."""
        servers = [
            LocalStorageServer(
                tmp_path / name,
                server_id=name,
                tubid=parse_furl(ann["anonymous-storage-FURL"]).tubid,
                permutation_seed=base32.decode(ann["permutation-seed-base32"]),
            )
            for name, ann in announcements.items()
        ]
        lease = base32.decode((SAMPLE_GRID / "lease-secret").read_text().strip())
        return Grid(servers, base32.decode(sample_convergence()), lease, EncodingConfig(NEEDED, HAPPY, TOTAL))

    for file_name in ("chk-2.5m", "chk-1m-plus-1", "mut-sdmf-text"):
        cap = parse_cap(sample_caps()[file_name])
        bucket = base32.encode(cap.storage_index or b"")
        shares = {path: int(path.name) for path in tmp_path.glob(f"s*/shares/*/{bucket}/*")}
        original = {shares[path]: share_data(path.read_bytes()) for path in shares}
        deleted = {path: shnum for path, shnum in shares.items() if path.parts[-5] in names[:2]}
        assert deleted and len(original) == TOTAL
        for path in deleted:
            path.unlink()

        result = on_grid(grid(), lambda grid, cap=cap: repair(grid, cap))
        assert result.successful and result.happiness_after >= HAPPY, (file_name, result)
        assert on_grid(grid(), lambda grid, cap=cap: contents(grid, cap)) == sample_plaintext(file_name)
        if isinstance(cap, ChkCap):
            assert set(result.placed) == set(deleted.values())
            now = {int(path.name): share_data(path.read_bytes()) for path in tmp_path.glob(f"s*/shares/*/{bucket}/*")}
            assert now == original, f"{file_name}: regenerated shares differ from Tahoe's"
