"""Background lease renewal against real storage-server processes: a cycle renews every share of every object a
root reaches (the lease blackmatch added at upload, not a new one), resumes after a restart from where it was,
records a failing server and goes on, and backs off while no server answers."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from fuse_client.grid_commands import create_node
from fuse_client.status_command import renewal_summary
from grid_server.filesystem import FilesystemOptions, GridFilesystem, open_filesystem
from grid_server.lease_renewal import STATE_FILE
from grid_server.lease_schedule import Done, Idle, Running, Schedule, from_json, to_json
from grid_server.node_state import root_key
from lafs_core import base32
from lafs_core.caps import Cap, DirectoryCap, parse_cap
from lafs_core.grid.directory import create_directory, linker, modify_directory
from lafs_core.grid.mutable_io import create_mutable
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid
from lafs_core.grid.upload import bytes_chunks, upload_immutable
from lafs_core.storage.containers import (
    IMMUTABLE_DATA_OFFSET,
    MUTABLE_DATA_OFFSET,
    MUTABLE_HEADER,
    MUTABLE_LEASE,
    is_mutable_container,
    parse_immutable_container,
    parse_mutable_header,
    parse_mutable_leases,
)

from .mounting import MODE, Mount, blackmatch, requires_fuse
from .storage_cluster import StorageCluster

OPTIONS = FilesystemOptions(cache_size=16 << 20)
WAIT = 120.0  # seconds a test waits for a cycle before it fails (never what makes it pass)

Tree = dict[tuple[str, ...], Cap]


def lease_expirations(share: Path) -> list[int]:
    """The expiration time of every lease on one share file, read from its container (Tahoe's layout)."""
    raw = share.read_bytes()
    if is_mutable_container(raw[:32]):
        header = parse_mutable_header(raw)
        leases = parse_mutable_leases(raw[MUTABLE_HEADER.size : MUTABLE_DATA_OFFSET])
        at = header.extra_lease_offset
        (extra,) = struct.unpack(">L", raw[at : at + 4])
        extras = [fields[1] for fields in MUTABLE_LEASE.iter_unpack(raw[at + 4 : at + 4 + extra * MUTABLE_LEASE.size])]
        return [lease.expiration for lease in leases] + extras
    header = raw[:IMMUTABLE_DATA_OFFSET]
    leases_at = IMMUTABLE_DATA_OFFSET + parse_immutable_container(header, len(raw)).data_length
    return [lease.expiration for lease in parse_immutable_container(header, len(raw), raw[leases_at:]).leases]


def leases_of(cluster: StorageCluster, cap: Cap) -> dict[Path, list[int]]:
    """Every share file of `cap` on every server of the cluster, with its leases' expirations."""
    assert cap.storage_index is not None
    name = base32.encode(cap.storage_index)
    found = {
        path: lease_expirations(path)
        for index in range(len(cluster.servers))
        for path in cluster.share_files(index)
        if path.parent.name == name
    }
    assert found, f"no shares of {cap.abbreviated()}"
    return found


def leases_in(cluster: StorageCluster, tree: Tree) -> dict[tuple[str, ...], dict[Path, list[int]]]:
    return {path: leases_of(cluster, cap) for path, cap in tree.items() if cap.storage_index is not None}


@pytest.fixture
def node(cluster: StorageCluster, tmp_path: Path) -> NodeDirectory:
    """A node of the cluster renewing once a day, at a pace a test need not wait for, with its root's first cycle
    due now (as it is on a root whose last cycle finished a day ago)."""
    node = create_node(tmp_path / "node", needed=3, happy=5, total=10, server_files=cluster.servers_files)
    configure(node, rate=50)
    save_schedule(node, to_json(Idle(0.0)))
    return node


def configure(node: NodeDirectory, rate: int, repair: bool = False) -> None:
    cfg = node.path / "tahoe.cfg"
    text = cfg.read_text().split("\n[blackmatch]\n")[0]
    settings = f"lease.renewal_interval = 1 day\nlease.renewal_rate = {rate}\n"
    cfg.write_text(f"{text}\n[blackmatch]\n{settings}" + ("repair.background = true\n" if repair else ""))


def state_file(node: NodeDirectory) -> Path:
    root = parse_cap(node.aliases()["tahoe"])
    assert isinstance(root, DirectoryCap)
    directory = node.state_dir / "roots" / root_key(root)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / STATE_FILE


def save_schedule(node: NodeDirectory, saved: dict) -> None:
    state_file(node).write_text(json.dumps(saved))


def saved_schedule(node: NodeDirectory) -> Schedule | None:
    return from_json(json.loads(state_file(node).read_text()))


def build_tree(node: NodeDirectory) -> Tree:
    """Under the root: CHK and literal files, an SDMF and an MDMF directory, a mutable file, nested."""

    async def build() -> Tree:
        grid = open_grid(node)
        try:
            root = parse_cap(node.aliases()["tahoe"])
            assert isinstance(root, DirectoryCap)
            sdmf = await create_directory(grid)
            mdmf = await create_directory(grid, file_format="mdmf")
            tree: Tree = {
                (): root,
                ("a-big",): await upload_immutable(grid, 200_000, bytes_chunks(b"x" * 200_000)),
                ("b-small",): await upload_immutable(grid, 5, bytes_chunks(b"small")),
                ("c-dir",): sdmf,
                ("c-dir", "inner"): await upload_immutable(grid, 70_000, bytes_chunks(b"y" * 70_000)),
                ("c-dir", "mdmf"): mdmf,
                ("c-dir", "mdmf", "mutable"): await create_mutable(grid, b"mutable content", "mdmf"),
                ("d-file",): await upload_immutable(grid, 90_000, bytes_chunks(b"z" * 90_000)),
            }
            for path, cap in tree.items():
                if path:
                    parent = tree[path[:-1]]
                    assert isinstance(parent, DirectoryCap)
                    await modify_directory(grid, parent, linker(path[-1], cap, replace_files=False))
            return tree
        finally:
            await grid.aclose()

    return trio.run(build)


def with_filesystem(node: NodeDirectory, body: Callable[[GridFilesystem], Awaitable[None]]) -> None:
    async def main() -> None:
        async with open_filesystem(node, node.aliases()["tahoe"], OPTIONS) as fs:
            await body(fs)

    trio.run(main)


async def until(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"no {what} within {WAIT} s")


async def cycle_done(fs: GridFilesystem) -> None:
    await until(lambda: isinstance(fs.lease_renewal.schedule, Done), "finished renewal cycle")


def later_for_every_share(before: dict, after: dict) -> bool:
    return all(
        len(after[path][share]) == len(expirations)  # renewed: no second lease
        and all(new > old for new, old in zip(after[path][share], expirations, strict=True))
        for path, shares in before.items()
        for share, expirations in shares.items()
    )


def test_a_cycle_renews_every_share_of_every_object_and_status_shows_it(
    cluster: StorageCluster, node: NodeDirectory
) -> None:
    tree = build_tree(node)
    before = leases_in(cluster, tree)
    assert all(len(expirations) == 1 for shares in before.values() for expirations in shares.values())
    time.sleep(1.1)  # expirations are whole seconds: a renewal now sets later ones

    async def body(fs: GridFilesystem) -> None:
        await cycle_done(fs)
        state = (await fs.queue_state())["lease_renewal"]
        assert state["last_result"] == {
            "renewed": 7,
            "errors": 0,
            "skipped": 1,
            "failed_servers": [],
            "unlisted": [],
            "repaired": 0,
            "repair_failures": 0,
            "repair_failed": [],
        }
        assert state["repair"] is False
        assert not state["running"] and state["progress"] is None and state["error"] is None
        assert state["next_due_at"] == pytest.approx(state["last_finished_at"] + 86400)
        assert time.time() - 60 < state["last_finished_at"] <= time.time()

    with_filesystem(node, body)
    after = leases_in(cluster, tree)
    assert after.keys() == before.keys() and later_for_every_share(before, after)
    saved = saved_schedule(node)
    assert isinstance(saved, Done) and saved.result.tally.renewed == 7

    time.sleep(1.1)  # opened again within the interval: waits, renewing nothing

    async def waits(fs: GridFilesystem) -> None:
        assert fs.lease_renewal.schedule == saved
        state = (await fs.queue_state())["lease_renewal"]
        assert state["next_due_at"] == pytest.approx(saved.result.finished_at + 86400)
        await trio.sleep(0.5)

    with_filesystem(node, waits)
    assert leases_in(cluster, tree) == after


def test_a_cycle_cut_short_resumes_after_its_position(cluster: StorageCluster, node: NodeDirectory) -> None:
    tree = build_tree(node)
    configure(node, rate=4)  # slow enough to be stopped midway
    time.sleep(1.1)

    async def stopped_midway(fs: GridFilesystem) -> None:
        running = lambda: fs.lease_renewal.schedule  # noqa: E731
        await until(lambda: isinstance(running(), Running) and running().tally.objects >= 3, "three objects done")
        state = (await fs.queue_state())["lease_renewal"]
        assert state["running"] and state["progress"]["objects"] >= 3 and state["next_due_at"] is None

    with_filesystem(node, stopped_midway)
    stopped = saved_schedule(node)
    assert isinstance(stopped, Running) and stopped.position is not None
    done = {path for path in tree if path <= stopped.position}
    assert 3 <= len(done) < len(tree)
    middle = leases_in(cluster, tree)
    time.sleep(1.1)

    with_filesystem(node, cycle_done)
    after = leases_in(cluster, tree)
    for path in middle:
        if path in done:
            assert after[path] == middle[path], f"{path} renewed again"
        else:
            assert later_for_every_share({path: middle[path]}, after), f"{path} not renewed"
    result = saved_schedule(node)
    assert isinstance(result, Done)
    assert (result.result.tally.renewed, result.result.tally.skipped) == (7, 1)  # each object once in all
    assert result.result.started_at == stopped.started_at


def test_a_server_down_is_recorded_and_no_server_backs_off(cluster: StorageCluster, node: NodeDirectory) -> None:
    build_tree(node)
    nickname = cluster.servers[0].nickname
    try:
        cluster.stop(0)

        async def one_down(fs: GridFilesystem) -> None:
            await cycle_done(fs)
            result = (await fs.queue_state())["lease_renewal"]["last_result"]
            assert result["errors"] == 7 and result["renewed"] == 0 and result["failed_servers"] == [nickname]

        with_filesystem(node, one_down)
        for index in range(1, len(cluster.processes)):
            cluster.stop(index)
        save_schedule(node, to_json(Idle(0.0)))

        async def all_down(fs: GridFilesystem) -> None:
            await until(lambda: fs.lease_renewal.failures.get("grid") is not None, "failure")
            state = (await fs.queue_state())["lease_renewal"]
            assert state["error"]["attempts"] == 1 and state["error"]["next_try_in"] > 0
            assert "no storage server answered" in state["error"]["error"]
            assert not state["running"] and isinstance(fs.lease_renewal.schedule, Running)

        with_filesystem(node, all_down)
    finally:
        for index, process in enumerate(cluster.processes):
            if not process.running:
                cluster.restart(index)


@requires_fuse
@pytest.mark.skipif(MODE != "split", reason="status asks the grid server, which only split mode runs")
def test_status_shows_a_mounted_roots_last_renewal(
    cluster: StorageCluster, node: NodeDirectory, tmp_path: Path
) -> None:
    build_tree(node)
    with Mount(node.path, tmp_path / "mnt"):
        deadline = time.monotonic() + WAIT
        while True:
            status = blackmatch("status", "-d", str(node.path))
            line = next((line for line in status.stdout.splitlines() if line.startswith("Lease renewal")), "")
            if "last finished" in line or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert line.startswith("Lease renewal (tahoe:): last finished "), status.stdout
    assert ": 7 objects renewed; next due " in line and "URI:" not in status.stdout, line


def test_status_line_of_a_cycle_with_problems() -> None:
    state = {
        "enabled": True,
        "interval": 86400,
        "last_finished_at": 0.0,
        "last_result": {
            "renewed": 5,
            "errors": 2,
            "skipped": 1,
            "failed_servers": ["alpha", "beta"],
            "unlisted": ["/a", "/b", "/c", "/d"],
            "repaired": 3,
            "repair_failures": 1,
            "repair_failed": ["/e"],
        },
        "repair": True,
        "running": False,
        "progress": {"objects": 1, "position": "/", "started_at": 10.0},
        "next_due_at": None,
        "error": {"item": "lease renewal", "error": "no storage server answered", "attempts": 3, "next_try_in": 7.5},
    }
    line = renewal_summary(state)
    assert line.startswith("last finished ")
    assert line.endswith(
        ": 5 objects renewed, 2 with errors (failed: alpha, beta), 4 directories not listed (/a, /b, /c, ...), "
        "3 repaired, 1 repair failed (/e); "
        "cycle half done: 1 object done; failing (3 tries, next try in 8 s): no storage server answered"
    )
    assert ", 3 repaired" not in renewal_summary({**state, "repair": False})
    assert renewal_summary({**state, "enabled": False}).startswith("off")


def delete_shares(cluster: StorageCluster, tree: Tree, servers: range) -> set[Path]:
    """Delete every share of the tree's stored objects that `servers` hold (as disks lost); the files deleted."""
    homes = [cluster.servers[index].path for index in servers]
    lost = {
        share
        for path, cap in tree.items()
        if cap.storage_index is not None
        for share in leases_of(cluster, cap)
        if any(share.is_relative_to(home) for home in homes)
    }
    for share in lost:
        share.unlink()
    return lost


def deep_check(node: NodeDirectory) -> int:
    """`blackmatch deep-check tahoe:`'s exit status: 0 healthy, 3 something unhealthy."""
    done = blackmatch("deep-check", "-d", str(node.path), "tahoe:")
    assert done.returncode in (0, 3), done.stderr
    return done.returncode


@pytest.mark.parametrize("background", [True, False], ids=["repair-on", "repair-off"])
def test_background_repair_makes_a_damaged_tree_healthy_only_when_asked(
    cluster: StorageCluster, node: NodeDirectory, background: bool
) -> None:
    configure(node, rate=50, repair=background)
    tree = build_tree(node)
    lost = delete_shares(cluster, tree, range(2))
    assert len(lost) >= 2 * 7 and deep_check(node) == 3  # each server held shares of all 7 stored objects

    async def body(fs: GridFilesystem) -> None:
        await cycle_done(fs)
        state = (await fs.queue_state())["lease_renewal"]
        assert state["repair"] is background
        result = state["last_result"]
        assert (result["renewed"], result["repaired"], result["repair_failed"]) == (7, 7 if background else 0, [])
        assert "URI:" not in json.dumps(state)

    with_filesystem(node, body)
    if background:
        assert deep_check(node) == 0
        assert lost <= {share for shares in leases_in(cluster, tree).values() for share in shares}
    else:
        assert deep_check(node) == 3
        assert not lost & {share for shares in leases_in(cluster, tree).values() for share in shares}


def test_a_repair_that_needs_a_write_cap_is_recorded_once_a_cycle(cluster: StorageCluster, node: NodeDirectory) -> None:
    configure(node, rate=50, repair=True)

    async def link_read_only() -> Cap:
        grid = open_grid(node)
        try:
            mutable = await create_mutable(grid, b"shared with us, read-only", "sdmf")
            root = parse_cap(node.aliases()["tahoe"])
            assert isinstance(root, DirectoryCap)
            await modify_directory(grid, root, linker("shared", mutable.readonly(), replace_files=False))
            return mutable
        finally:
            await grid.aclose()

    shared = trio.run(link_read_only)
    lost = delete_shares(cluster, {("shared",): shared}, range(2))
    assert lost

    async def body(fs: GridFilesystem) -> None:
        await cycle_done(fs)
        state = (await fs.queue_state())["lease_renewal"]
        result = state["last_result"]
        assert (result["renewed"], result["repaired"], result["repair_failed"]) == (2, 0, ["/shared"])
        assert ", 0 repaired, 1 repair failed (/shared); next due " in renewal_summary(state)

    with_filesystem(node, body)
    assert not lost & set(leases_of(cluster, shared))  # nothing could be written without the write cap


def test_a_bad_setting_fails_the_mount_in_one_line_naming_it(tmp_path: Path) -> None:
    node = create_node(tmp_path / "node", local_grid=3, needed=2, happy=2, total=3)
    with open(node.path / "tahoe.cfg", "a") as cfg:
        cfg.write("\n[blackmatch]\nlease.renewal_interval = weekly\n")
    result = blackmatch("mount", str(tmp_path / "mnt"), "-d", str(node.path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("blackmatch: error: tahoe.cfg: [blackmatch] lease.renewal_interval: 'weekly'")
    assert not (tmp_path / "mnt").exists()


def test_a_new_roots_first_cycle_is_saved_as_due_soon_and_a_short_mount_keeps_it(tmp_path: Path) -> None:
    node = create_node(tmp_path / "node", local_grid=3, needed=2, happy=2, total=3)

    async def glance(fs: GridFilesystem) -> None:
        await trio.testing.wait_all_tasks_blocked()  # the renewal task has started, and waits for the due time
        assert (await fs.queue_state())["lease_renewal"]["last_result"] is None

    opened = time.time()
    with_filesystem(node, glance)
    first = saved_schedule(node)
    assert isinstance(first, Idle) and opened + 590 < first.due <= time.time() + 600
    with_filesystem(node, glance)
    assert saved_schedule(node) == first  # not pushed back by the next start
