"""The lease checker: a pass over a share store deletes shares whose leases all expired, and nothing else.

In-process passes over a ShareStore check the details (uploads in progress, unreadable containers, empty
buckets, a pass interrupted and resumed); real `blackmatch storage run` processes check the whole: a client
renews one file's leases over GBS, the checker deletes the other file's shares and keeps the renewed one, which
still reads byte for byte, and a server without expiry deletes nothing.

Time never passes in these tests: leases are made old by moving their stored expiration times back, as if the
server had been stopped for that long.
"""

from __future__ import annotations

import datetime
import os
import re
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from lafs_core import base32
from lafs_core.caps import ChkCap, MutableWriteCap
from lafs_core.grid.download import read_immutable
from lafs_core.grid.grid import Grid
from lafs_core.grid.mutable_io import create_mutable, retrieve
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid
from lafs_core.grid.upload import bytes_chunks, upload_immutable
from lafs_core.mutable.slot import TestAndWrite, WriteVector, new_share_test
from lafs_core.storage.containers import (
    IMMUTABLE_DATA_OFFSET,
    IMMUTABLE_LEASE,
    MUTABLE_HEADER,
    MUTABLE_LEASE,
    MUTABLE_LEASE_SLOTS,
    is_mutable_container,
    parse_immutable_container,
    parse_mutable_header,
)
from lafs_core.storage.expiry import ExpirySettings, parse_cutoff_date
from lafs_core.storage.gbs_server import GbsServer
from lafs_core.storage.lease_checker import CheckerState, LeaseChecker, Pacing, load_state
from lafs_core.storage.share_store import ShareStore

from .storage_cluster import StorageCluster, blackmatch

T = TypeVar("T")
DAY = 24 * 3600
RENEW, CANCEL, UPLOAD, WRITE_ENABLER = b"r" * 32, b"c" * 32, b"u" * 32, b"w" * 32
ONE_PASS = Pacing(slice_seconds=3600.0, slow_start=0.0)
AGE = ExpirySettings(enabled=True, mode="age")  # a lease expires at its own expiration time


# --- helpers ---------------------------------------------------------------------------------------------------
def backdate_leases(path: Path, seconds: int) -> None:
    """Move every lease expiration of a share file `seconds` into the past, as if it were granted that earlier."""
    raw = bytearray(path.read_bytes())
    if is_mutable_container(raw):
        header = parse_mutable_header(raw)
        (extra,) = struct.unpack_from(">L", raw, header.extra_lease_offset)
        records = [MUTABLE_HEADER.size + i * MUTABLE_LEASE.size for i in range(MUTABLE_LEASE_SLOTS)]
        records += [header.extra_lease_offset + 4 + i * MUTABLE_LEASE.size for i in range(extra)]
        for at in records:
            owner, expiration = struct.unpack_from(">LL", raw, at)
            if owner:
                struct.pack_into(">L", raw, at + 4, expiration - seconds)
    else:
        info = parse_immutable_container(raw, len(raw))
        for i in range(len(raw[IMMUTABLE_DATA_OFFSET + info.data_length :]) // IMMUTABLE_LEASE.size):
            at = IMMUTABLE_DATA_OFFSET + info.data_length + i * IMMUTABLE_LEASE.size + 68  # owner, 2 hashes, expiry
            (expiration,) = struct.unpack_from(">L", raw, at)
            struct.pack_into(">L", raw, at, expiration - seconds)
    path.write_bytes(raw)


class Killed(Exception):
    """Stands for SIGKILL: the checker stops where it is, without saving anything more."""


def storage_index(n: int) -> bytes:
    """Index n (1..): a distinct two-letter prefix each, in order of n, that is no whole base32 byte string."""
    return bytes([n * 9, 0xFF]) + bytes(14)


def put_immutable(store: ShareStore, si: bytes, shnums: set[int], data: bytes = b"immutable share data") -> None:
    store.allocate(si, RENEW, CANCEL, UPLOAD, shnums, len(data))
    for shnum in shnums:
        assert store.write(si, shnum, UPLOAD, 0, data) == []


def put_mutable(store: ShareStore, si: bytes, shnum: int = 0, data: bytes = b"mutable share data") -> None:
    vectors = {shnum: TestAndWrite((new_share_test(),), (WriteVector(0, data),))}
    assert store.read_test_write(si, WRITE_ENABLER, RENEW, CANCEL, vectors, []).success


def bucket(store: ShareStore, si: bytes) -> Path:
    name = base32.encode(si)
    return store.shares_dir / name[:2] / name


def share_paths(store: ShareStore) -> list[Path]:
    return [p for p in store.shares_dir.glob("*/*/*") if "incoming" not in p.parts]


def age_all_leases(store: ShareStore, seconds: int) -> None:
    for path in share_paths(store):
        backdate_leases(path, seconds)


def run_pass(store: ShareStore, state_path: Path, settings: ExpirySettings) -> LeaseChecker:
    """One whole pass of a checker over `store`, its state saved as the server saves it."""

    async def main() -> LeaseChecker:
        server = GbsServer(store, b"swissnum")
        checker = LeaseChecker(server.call_store, store.shares_dir, state_path, settings, pacing=ONE_PASS)
        assert await checker.run_slice()
        return checker

    return trio.run(main)


# --- in-process passes -------------------------------------------------------------------------------------------
@pytest.fixture
def aged_store(tmp_path: Path) -> ShareStore:
    """Two immutable and two mutable storage indexes, all leases 40 days old; index 3 and 4 then renewed."""
    store = ShareStore(tmp_path / "storage")
    put_immutable(store, storage_index(1), {0, 1})
    put_mutable(store, storage_index(2))
    put_immutable(store, storage_index(3), {2})
    put_mutable(store, storage_index(4), 5)
    age_all_leases(store, 40 * DAY)
    for renewed in (storage_index(3), storage_index(4)):
        assert store.add_or_renew_lease(renewed, RENEW, CANCEL)
    return store


def test_a_pass_deletes_expired_shares_and_keeps_renewed_ones(aged_store: ShareStore, tmp_path: Path) -> None:
    store = aged_store
    expired_bytes = sum(p.stat().st_size for si in (1, 2) for p in bucket(store, storage_index(si)).iterdir())
    kept = {p: p.read_bytes() for si in (3, 4) for p in bucket(store, storage_index(si)).iterdir()}
    checker = run_pass(store, tmp_path / "state.json", AGE)
    assert not bucket(store, storage_index(1)).exists() and not bucket(store, storage_index(2)).exists()
    assert {p: p.read_bytes() for p in share_paths(store)} == kept
    assert store.read_immutable(storage_index(3), 2, 0, 100) == b"immutable share data"
    assert store.read_mutable(storage_index(4), 5, 0, 100) == b"mutable share data"
    last = checker.state.last_pass
    assert last is not None
    assert (last["buckets"], last["shares"], last["expired"], last["deleted"]) == (4, 5, 3, 3)
    assert last["reclaimed_bytes"] == expired_bytes and last["pass"] == 0 and not last["resumed"]
    assert load_state(tmp_path / "state.json") == checker.state  # what a later `status` reads


def test_a_state_file_that_cannot_be_saved_does_not_stop_the_pass(aged_store: ShareStore, tmp_path: Path) -> None:
    """A full or failing disk: the checker goes on from the state in memory (the server keeps serving)."""
    checker = run_pass(aged_store, tmp_path / "no-such-directory" / "state.json", AGE)
    assert checker.state.last_pass is not None and checker.state.last_pass["deleted"] == 3
    assert not (tmp_path / "no-such-directory").exists()


def test_a_pass_without_expiry_deletes_nothing_but_counts(aged_store: ShareStore, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in share_paths(aged_store)}
    checker = run_pass(aged_store, tmp_path / "state.json", ExpirySettings(enabled=False))
    assert {p: p.read_bytes() for p in share_paths(aged_store)} == before
    last = checker.state.last_pass
    assert last is not None and (last["expired"], last["deleted"], last["reclaimed_bytes"]) == (3, 0, 0)


def test_a_kind_left_out_of_expiry_is_kept(aged_store: ShareStore, tmp_path: Path) -> None:
    run_pass(aged_store, tmp_path / "state.json", ExpirySettings(enabled=True, mode="age", mutable=False))
    assert not bucket(aged_store, storage_index(1)).exists()
    assert aged_store.mutable_shares(storage_index(2)) == {0}


def test_cutoff_date_mode_expires_leases_not_renewed_since_the_day(tmp_path: Path) -> None:
    store = ShareStore(tmp_path / "storage")
    put_immutable(store, storage_index(1), {0})
    put_mutable(store, storage_index(2))
    today = datetime.datetime.now(datetime.UTC).date()
    # Midnight starting yesterday: leases granted just now were renewed since, and are kept.
    yesterday = ExpirySettings(True, "cutoff-date", cutoff_date=parse_cutoff_date(str(today - datetime.timedelta(1))))
    run_pass(store, tmp_path / "state.json", yesterday)
    assert len(share_paths(store)) == 2
    tomorrow = ExpirySettings(True, "cutoff-date", cutoff_date=parse_cutoff_date(str(today + datetime.timedelta(1))))
    checker = run_pass(store, tmp_path / "state.json", tomorrow)
    assert share_paths(store) == []
    assert checker.state.last_pass is not None and checker.state.last_pass["deleted"] == 2


def test_one_live_lease_among_expired_ones_keeps_a_share(tmp_path: Path) -> None:
    store = ShareStore(tmp_path / "storage")
    put_immutable(store, storage_index(1), {0})
    put_mutable(store, storage_index(2))
    secrets = [(bytes([i]) * 32, bytes([i + 100]) * 32) for i in range(1, 6)]
    for si in (storage_index(1), storage_index(2)):
        for renew, cancel in secrets:  # the mutable share's fifth lease lands in its extra-lease block
            assert store.add_or_renew_lease(si, renew, cancel)
    age_all_leases(store, 40 * DAY)
    for si in (storage_index(1), storage_index(2)):
        assert store.add_or_renew_lease(si, *secrets[-1])
    checker = run_pass(store, tmp_path / "state.json", AGE)
    assert store.immutable_shares(storage_index(1)) == {0} and store.mutable_shares(storage_index(2)) == {0}
    assert [len(share.lease_expirations or ()) for share in store.stored_shares(storage_index(2))] == [6]
    last = checker.state.last_pass
    assert last is not None and (last["shares"], last["expired"]) == (2, 0)


def test_a_pass_leaves_uploads_unreadable_shares_and_leaseless_buckets_alone(tmp_path: Path) -> None:
    store = ShareStore(tmp_path / "storage")
    put_immutable(store, storage_index(1), {0})
    store.allocate(storage_index(1), RENEW, CANCEL, UPLOAD, {1}, 100)  # an upload in progress
    store.write(storage_index(1), 1, UPLOAD, 0, b"x" * 10)
    age_all_leases(store, 40 * DAY)
    unreadable = bucket(store, storage_index(5)) / "3"
    unreadable.parent.mkdir(parents=True)
    unreadable.write_bytes(b"\x00\x00\x00\x07 not a container")
    empty = bucket(store, storage_index(6))
    empty.mkdir(parents=True)  # what a kill between deleting the last share and its directory leaves
    incoming = list(store.incoming_dir.glob("*/*/1"))
    assert len(incoming) == 1
    checker = run_pass(store, tmp_path / "state.json", AGE)
    assert store.immutable_shares(storage_index(1)) == set()
    assert incoming[0].read_bytes()[IMMUTABLE_DATA_OFFSET:][:10] == b"x" * 10
    assert unreadable.exists() and not empty.exists()
    last = checker.state.last_pass
    assert last is not None and (last["deleted"], last["unreadable"]) == (1, 1)


def kill_during_pass(store: ShareStore, state_path: Path, slices: int) -> list[float]:
    """Run a checker that looks at one bucket a slice and is killed in its pause after `slices` slices; returns
    the pauses it asked for (the first is the slow start)."""
    pauses: list[float] = []

    async def sleep_then_die(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == slices + 1:
            raise Killed

    async def main() -> None:
        server = GbsServer(store, b"swissnum")
        pacing = Pacing(slice_seconds=0.0, slow_start=5.0)
        checker = LeaseChecker(
            server.call_store, store.shares_dir, state_path, AGE, pacing=pacing, sleep=sleep_then_die
        )
        await checker.run()

    with pytest.raises(Killed):
        trio.run(main)
    return pauses


def aged_buckets(store: ShareStore, count: int) -> None:
    """Storage indexes 1..count with two immutable shares each, all leases 40 days old."""
    for n in range(1, count + 1):
        put_immutable(store, storage_index(n), {0, 1})
    age_all_leases(store, 40 * DAY)


def test_an_interrupted_pass_resumes_after_the_last_saved_bucket(tmp_path: Path) -> None:
    store = ShareStore(tmp_path / "storage")
    aged_buckets(store, 6)
    state_path = tmp_path / "state.json"
    pauses = kill_during_pass(store, state_path, 3)
    assert pauses[0] == 5.0 and all(0 <= p <= Pacing().longest_pause for p in pauses[1:])
    saved = load_state(state_path)
    assert saved.current_pass == 0 and saved.position == base32.encode(storage_index(3))
    assert [n for n in range(1, 7) if bucket(store, storage_index(n)).exists()] == [4, 5, 6]
    put_immutable(store, storage_index(2), {0})  # an old share behind the saved place: this pass has gone by
    backdate_leases(bucket(store, storage_index(2)) / "0", 40 * DAY)
    checker = run_pass(store, state_path, AGE)  # as the restarted server goes on
    last = checker.state.last_pass
    assert last is not None and last["resumed"] and last["pass"] == 0
    assert (last["buckets"], last["shares"], last["deleted"]) == (6, 12, 12)  # each bucket examined once
    assert [n for n in range(1, 7) if bucket(store, storage_index(n)).exists()] == [2]


def test_an_unreadable_state_file_starts_a_fresh_pass(tmp_path: Path) -> None:
    state_path = tmp_path / "state.json"
    state_path.write_bytes(b'{"version": 1, "position": ')
    assert load_state(state_path) == CheckerState()
    state_path.write_bytes(CheckerState(current_pass=3, position="aa").to_json())
    assert load_state(state_path).position == "aa"


# --- real server processes ---------------------------------------------------------------------------------------
def configure(server_dir: Path, **settings: str) -> None:
    """Add `expire.*` settings (underscores in the keyword as in Tahoe's names) to a server's [storage]."""
    with open(server_dir / "server.cfg", "a", encoding="utf-8") as f:
        for key, value in settings.items():
            f.write(f"expire.{key} = {value}\n")


def on_node(node: Path, work: Callable[[Grid], Awaitable[T]]) -> T:
    async def main() -> T:
        grid = open_grid(NodeDirectory(node))
        try:
            return await work(grid)
        finally:
            await grid.aclose()

    return trio.run(main)


PASS_LINE = re.compile(
    r"pass (\d+) finished(?P<resumed> \(resumed after a restart\))?: (?P<shares>\d+) shares in "
    r"(?P<buckets>\d+) buckets examined, (?P<expired>\d+) expired, (?P<deleted>\d+) deleted"
)


def pass_counts(line: str) -> tuple[int, int, int, int]:
    """(buckets, shares, expired, deleted) from a server's log line for a finished pass."""
    match = PASS_LINE.search(line)
    assert match, line
    return int(match["buckets"]), int(match["shares"]), int(match["expired"]), int(match["deleted"])


def test_servers_delete_unrenewed_shares_and_keep_renewed_ones(tmp_path: Path) -> None:
    with StorageCluster(tmp_path / "grid", 4) as cluster:
        node = cluster.create_node(tmp_path / "node", needed=2, happy=4, total=4)
        contents = {name: os.urandom(20_000) for name in ("kept", "doomed", "kept-mutable", "doomed-mutable")}

        async def upload(grid: Grid) -> dict[str, ChkCap | MutableWriteCap]:
            caps: dict[str, ChkCap | MutableWriteCap] = {}
            for name, data in contents.items():
                if name.endswith("mutable"):
                    caps[name] = await create_mutable(grid, data, "sdmf")
                else:
                    cap = await upload_immutable(grid, len(data), bytes_chunks(data))
                    assert isinstance(cap, ChkCap)
                    caps[name] = cap
            return caps

        caps = on_node(node, upload)
        kept_buckets = {base32.encode(caps[name].storage_index) for name in ("kept", "kept-mutable")}
        # Each server holds one share of each file, and of the root directory `create-node` made.
        held = [{path.parent.name for path in cluster.share_files(index)} for index in range(4)]
        assert all(len(buckets) == len(cluster.share_files(index)) for index, buckets in enumerate(held))
        assert all(kept_buckets < buckets and len(buckets) >= 4 for buckets in held)
        for index in range(4):
            cluster.stop(index)
            for path in cluster.share_files(index):
                backdate_leases(path, 20 * DAY)  # the servers were off for 20 days
            cluster.restart(index)

        async def renew_kept(grid: Grid) -> None:  # what a client's lease renewal does: GBS PUT /lease/<si>
            for name in ("kept", "kept-mutable"):
                si = caps[name].storage_index
                for server in grid.servers:
                    await server.add_or_renew_lease(si, grid.lease(si, server))

        on_node(node, renew_kept)
        for index in range(4):
            cluster.stop(index)
            enabled = "true" if index < 3 else "false"  # the last server only reports what it would delete
            settings = {"enabled": enabled, "mode": "age", "override_lease_duration": "10 days"}
            configure(cluster.servers[index].path, **settings, cycle_time="1 seconds")
            cluster.restart(index)
        for index in range(4):
            line = cluster.processes[index].wait_for("lease checker: pass 0 finished")
            buckets = {path.parent.name for path in cluster.share_files(index)}
            count, doomed = len(held[index]), len(held[index]) - len(kept_buckets)
            if index < 3:
                assert pass_counts(line) == (count, count, doomed, doomed)
                assert buckets == kept_buckets
            else:  # expiry not enabled: it would have deleted the same shares, and keeps them
                assert pass_counts(line) == (count, count, doomed, 0) and "expiry disabled" in line
                assert buckets == held[index]
            # What `status` would read: pass 0's counts, or a later pass's over the shares left.
            last = load_state(cluster.servers[index].lease_checker_state).last_pass
            assert last is not None and last["shares"] == (count if last["pass"] == 0 else len(buckets))

        async def read_kept(grid: Grid) -> tuple[bytes, bytes]:
            kept, kept_mutable = caps["kept"], caps["kept-mutable"]
            assert isinstance(kept, ChkCap) and isinstance(kept_mutable, MutableWriteCap)
            return await read_immutable(grid, kept), (await retrieve(grid, kept_mutable))[0]

        assert on_node(node, read_kept) == (contents["kept"], contents["kept-mutable"])


def test_a_killed_server_resumes_its_pass(tmp_path: Path) -> None:
    with StorageCluster(tmp_path / "grid", 1) as cluster:
        cluster.stop(0)
        server = cluster.servers[0]
        store = ShareStore(server.store_root)
        aged_buckets(store, 6)
        kill_during_pass(store, server.lease_checker_state, 3)  # the state a server killed mid-pass leaves
        put_immutable(store, storage_index(2), {0})  # behind the saved place, so left to the next pass
        backdate_leases(bucket(store, storage_index(2)) / "0", 40 * DAY)
        configure(server.path, enabled="true", mode="age", cycle_time="1 seconds")
        cluster.restart(0)
        resumed = cluster.processes[0].wait_for("lease checker: pass 0 finished")
        assert "(resumed after a restart)" in resumed and pass_counts(resumed) == (6, 12, 12, 12)
        assert pass_counts(cluster.processes[0].wait_for("lease checker: pass 1 finished")) == (1, 1, 1, 1)
        assert cluster.share_files(0) == []


def test_a_server_with_a_bad_expiry_setting_refuses_to_start(tmp_path: Path) -> None:
    directory = tmp_path / "server"
    blackmatch("storage", "create", str(directory))
    configure(directory, enabled="true", mode="age", override_lease_duration="3 fortnights")
    done = blackmatch("storage", "run", str(directory), check=False)
    message = done.stderr.decode()
    assert done.returncode != 0 and message.count("\n") == 1, message
    assert "expire.override_lease_duration" in message and "Traceback" not in message
