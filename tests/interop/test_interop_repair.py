"""Check and repair across blackmatch and Tahoe-LAFS 1.20.0: each repairs what the other uploaded.

A real Tahoe grid on loopback (`tahoe_grid.TahoeGrid`: five Tahoe storage nodes, k=3 happy=5 N=10). A file loses
its shares on two of the five servers, deleted on disk as a lost disk would lose them: 4 of its 10 shares are gone
and happiness is 3.

1. Tahoe uploads (`tahoe put`, `put --mutable`, `--format=MDMF`, `tahoe mkdir`); `blackmatch check` calls the
   object not healthy, `blackmatch check --repair` / `deep-check --repair` (a blackmatch node with its own secrets;
   mutable objects by their write cap) repairs it, and then Tahoe's own `tahoe check --verify` and `tahoe
   deep-check --verify` find all 10 shares good on all five servers and `tahoe get` returns the bytes. The CHK
   shares blackmatch regenerates are byte for byte the ones deleted. On a grid of its own (the one other Tahoe
   grid this module starts), two servers leave for good and two new ones join instead: blackmatch, on the Tahoe
   client's node directory, repairs Tahoe's tree onto the new servers, and two more original servers can then
   leave while Tahoe still reads every file.
2. The other way: blackmatch uploads, Tahoe's `tahoe deep-check --repair` repairs, and `blackmatch deep-check
   --verify` calls everything healthy.
3. Leases: `blackmatch check --add-lease`, run on the Tahoe client's own node directory, renews the lease Tahoe's
   upload added (same secrets: the same lease, not a second one); another node's secrets add a second lease.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bootstrap
from lafs_core import base32
from lafs_core.caps import parse_cap
from lafs_core.storage.containers import (
    IMMUTABLE_DATA_OFFSET,
    IMMUTABLE_LEASE,
    LEASE_DURATION,
    MUTABLE_HEADER,
    MUTABLE_LEASE,
    is_mutable_container,
    share_data,
)

from .tahoe_grid import TahoeGrid
from .test_interop import (
    HAPPY,
    NEEDED,
    TOTAL,
    assert_all_shares,
    bm,
    bm_put,
    bm_run,
    bm_text,
    data_of,
    lease_count,
    lease_counts,
    make_nodes_on,
    share_map,
    share_paths,
    tahoe_check,
    tahoe_put,
    tahoe_text,
    tahoe_verify,
    web,
    web_mkdir,
    web_put,
)

pytestmark = pytest.mark.interop

HEALTHY, UNHEALTHY = 0, 3  # blackmatch check's exit status
LOST_SERVERS = 2


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TahoeGrid]:
    """Introducer, five Tahoe storage nodes and a Tahoe client, k=3 happy=5 N=10."""
    tahoe_exe = bootstrap.ensure_tahoe_venv()
    base = tmp_path_factory.mktemp("tahoe-grid")
    with TahoeGrid(base, tahoe_exe, num_storage=5, needed=NEEDED, happy=HAPPY, total=TOTAL) as running:
        yield running


@pytest.fixture(scope="module")
def bm_nodes(grid: TahoeGrid, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """blackmatch nodes with their own secrets: what they repair, they repair as any other client of the grid."""
    return make_nodes_on(grid, tmp_path_factory.mktemp("blackmatch-nodes"))


def lose_shares(grid: TahoeGrid, cap: str) -> dict[int, bytes]:
    """Delete every share of `cap` on the first two servers; returns share number -> the share data deleted."""
    lost: dict[int, bytes] = {}
    for path in share_paths(grid.storage_dirs[:LOST_SERVERS], cap):
        lost[int(path.name)] = share_data(path.read_bytes())
        path.unlink()
    left = [shnum for shnums in share_map(grid.storage_dirs, cap).values() for shnum in shnums]
    assert lost and len(left) >= NEEDED and not set(lost) & set(left), f"{sorted(lost)} lost, {sorted(left)} left"
    return lost


def shares_now(grid: TahoeGrid, cap: str) -> dict[int, list[bytes]]:
    """Share number -> the share data of each copy of it on the grid's servers."""
    found: dict[int, list[bytes]] = {}
    for path in share_paths(grid.storage_dirs, cap):
        found.setdefault(int(path.name), []).append(share_data(path.read_bytes()))
    return found


def assert_regenerated(grid: TahoeGrid, cap: str, lost: dict[int, bytes]) -> None:
    """Each lost CHK share exists again, once, byte for byte as it was (the encoding is deterministic)."""
    now = shares_now(grid, cap)
    for shnum, data in lost.items():
        assert now.get(shnum) == [data], f"share {shnum} of {cap} is not the one lost"


def bm_check(node: Path, command: str, *args: str) -> tuple[int, str]:
    """`blackmatch check|deep-check -d NODE ARGS`: its exit status (the verdict) and its output."""
    done = bm_run(command, "-d", str(node), *args)
    assert done.returncode in (HEALTHY, UNHEALTHY), done.stderr.decode(errors="replace")
    return done.returncode, done.stdout.decode()


def tahoe_deep_verify(grid: TahoeGrid, root: str) -> list[dict[str, Any]]:
    """`tahoe deep-check --verify --raw ROOT`: every object must be healthy, every non-LIT one with N good shares.

    Returns the object lines.
    """
    lines = [json.loads(line) for line in tahoe_text(grid, "deep-check", "--verify", "--raw", root).splitlines()]
    objects = [line for line in lines if line["type"] in ("file", "directory")]
    for line in objects:
        results = line["check-results"]["results"]
        assert results["healthy"] is True, line
        if line["storage-index"]:
            assert results["count-shares-good"] == TOTAL and results["count-corrupt-shares"] == 0, line
    stats = [line["stats"] for line in lines if line["type"] == "stats"]
    assert len(stats) == 1 and stats[0]["count-immutable-files"] + stats[0]["count-mutable-files"] > 0, lines
    return objects


# --- 1. Tahoe uploads, blackmatch repairs, Tahoe verifies ------------------------------------------------------
def test_blackmatch_repairs_tahoe_immutable(grid: TahoeGrid, bm_nodes: dict[str, Path]) -> None:
    node = bm_nodes["sdmf"]
    data = data_of(300_000, "repair-tahoe-chk")  # three segments
    cap = tahoe_put(grid, data)
    lost = lose_shares(grid, cap)

    status, report = bm_check(node, "check", cap)
    assert status == UNHEALTHY, report
    assert f"good-shares: {TOTAL - len(lost)} (encoding is {NEEDED}-of-{TOTAL})" in report

    status, report = bm_check(node, "check", "--verify", "--repair", cap)
    assert status == HEALTHY and " repair successful: " in report, report
    assert_all_shares(grid.storage_dirs, cap, mutable=False)
    assert_regenerated(grid, cap, lost)
    assert "Summary: Healthy" in tahoe_text(grid, "check", "--verify", cap)
    tahoe_verify(grid, cap)
    assert grid.tahoe("get", cap).stdout == data

    status, report = bm_check(node, "check", "--repair", cap)  # run again: nothing to do
    assert status == HEALTHY and "repair" not in report, report


def test_blackmatch_replaces_corrupt_tahoe_share(grid: TahoeGrid, bm_nodes: dict[str, Path]) -> None:
    """A byte flipped in a block of a share Tahoe wrote: blackmatch's --verify names the share and files an advisory
    the Tahoe server keeps, --repair gives the share a good copy elsewhere, and Tahoe's verifier agrees on both."""
    node = bm_nodes["sdmf"]
    cap = tahoe_put(grid, data_of(300_000, "corrupt-tahoe-chk"))
    server = grid.storage_dirs[0]
    share = share_paths([server], cap)[0]
    shnum, raw = int(share.name), bytearray(share.read_bytes())
    good = share_data(bytes(raw))
    raw[IMMUTABLE_DATA_OFFSET + len(good) // 2] ^= 0xFF  # the middle of the share: block data
    share.write_bytes(bytes(raw))
    si = base32.encode(parse_cap(cap).storage_index)

    status, report = bm_check(node, "check", "--verify", cap)
    assert status == UNHEALTHY and f"SI {si}, shnum {shnum}" in report, report
    advisories = list((server / "storage" / "corruption-advisories").glob(f"*--{si}-{shnum}"))
    assert len(advisories) == 1, "the Tahoe server kept no corruption advisory"

    status, report = bm_check(node, "check", "--verify", "--repair", cap)
    assert status == HEALTHY and " repair successful: " in report, report
    assert good in shares_now(grid, cap)[shnum]
    results = tahoe_check(grid, cap, "verify")["results"]
    assert results["healthy"] is True and results["count-shares-good"] == TOTAL, results
    assert [entry[1:] for entry in results["list-corrupt-shares"]] == [[si, shnum]], results


@pytest.mark.parametrize(("file_format", "size"), [("sdmf", 30000), ("mdmf", 300_000)])
def test_blackmatch_repairs_tahoe_mutable(
    grid: TahoeGrid, bm_nodes: dict[str, Path], file_format: str, size: int
) -> None:
    node = bm_nodes["sdmf"]
    data = data_of(size, f"repair-tahoe-{file_format}")
    cap = tahoe_put(grid, data, "--mutable" if file_format == "sdmf" else "--format=MDMF")
    lose_shares(grid, cap)
    status, report = bm_check(node, "check", cap)
    assert status == UNHEALTHY, report

    status, report = bm_check(node, "check", "--repair", cap)
    assert status == HEALTHY and " repair successful: " in report, report
    assert_all_shares(grid.storage_dirs, cap, mutable=True)
    tahoe_verify(grid, cap)
    assert grid.tahoe("get", cap).stdout == data
    # the republished version is one Tahoe can write over, and blackmatch reads what it wrote
    new = data_of(size // 2, f"repair-tahoe-{file_format}-v2")
    assert web_put(grid, cap, new) == cap
    assert bm("get", "-d", str(node), cap) == new


TREE_PATHS = ["", "chk.bin", "lit.txt", "sdmf.bin", "sub", "sub/mdmf.bin"]


def tahoe_tree(grid: TahoeGrid, seed: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """Tahoe makes an SDMF directory of a CHK, a LIT and an SDMF file, and an MDMF directory holding an MDMF file.

    Returns path -> cap of every object that has shares ("" is the root; the LIT file has none), and path -> the
    contents of every file.
    """
    root = tahoe_text(grid, "mkdir")
    contents = {
        "chk.bin": data_of(200_000, f"{seed}-chk"),
        "lit.txt": b"small enough for the cap\n",
        "sdmf.bin": data_of(20000, f"{seed}-sdmf"),
        "sub/mdmf.bin": data_of(150_000, f"{seed}-mdmf"),
    }
    caps = {"": root, "chk.bin": tahoe_put(grid, contents["chk.bin"], f"{root}/chk.bin")}
    tahoe_put(grid, contents["lit.txt"], f"{root}/lit.txt")
    caps["sdmf.bin"] = web_put(grid, f"{root}/sdmf.bin", contents["sdmf.bin"], "?format=SDMF")
    caps["sub"] = web_mkdir(grid, f"{root}/sub", "MDMF")
    caps["sub/mdmf.bin"] = web_put(grid, f"{root}/sub/mdmf.bin", contents["sub/mdmf.bin"], "?format=MDMF")
    return caps, contents


def assert_tree_repaired(grid: TahoeGrid, caps: dict[str, str], contents: dict[str, bytes]) -> None:
    """Every share of every object on the grid's servers, Tahoe's deep-check --verify healthy, every file readable."""
    for path, cap in caps.items():
        assert_all_shares(grid.storage_dirs, cap, mutable=path != "chk.bin")
    checked = tahoe_deep_verify(grid, caps[""])
    assert sorted("/".join(line["path"]) for line in checked) == TREE_PATHS
    for path, data in contents.items():
        assert web(grid, f"{caps['']}/{path}") == data


def test_blackmatch_deep_repairs_tahoe_tree(grid: TahoeGrid, bm_nodes: dict[str, Path]) -> None:
    node = bm_nodes["sdmf"]
    caps, contents = tahoe_tree(grid, "deep-tahoe")
    lost = {path: lose_shares(grid, cap) for path, cap in caps.items()}

    status, report = bm_check(node, "deep-check", caps[""])
    assert status == UNHEALTHY and "done: 6 objects checked, 1 healthy, 5 unhealthy" in report, report

    status, report = bm_check(node, "deep-check", "--repair", caps[""])
    assert status == HEALTHY, report
    assert " 5 repairs attempted, 5 successful, 0 failed" in report, report
    assert " post-repair: 6 healthy, 0 unhealthy" in report, report
    assert_regenerated(grid, caps["chk.bin"], lost["chk.bin"])
    assert_tree_repaired(grid, caps, contents)


@pytest.fixture
def grid_to_take_apart(tmp_path: Path) -> Iterator[TahoeGrid]:
    """A grid of its own for the one test that stops servers for good."""
    tahoe_exe = bootstrap.ensure_tahoe_venv()
    with TahoeGrid(tmp_path / "grid", tahoe_exe, num_storage=5, needed=NEEDED, happy=HAPPY, total=TOTAL) as running:
        yield running


def test_blackmatch_repairs_tahoe_tree_after_servers_left(grid_to_take_apart: TahoeGrid) -> None:
    """Two of five servers leave for good and two new ones join; blackmatch, on the Tahoe client's own node
    directory (its introducer cache), repairs Tahoe's tree, Tahoe verifies it, and then two more of the original
    servers can leave while Tahoe still reads every file."""
    grid = grid_to_take_apart
    caps, contents = tahoe_tree(grid, "servers-left")
    original = list(grid.storage_dirs)
    for server in original[:LOST_SERVERS]:
        grid.remove_storage_node(server)
    for _ in range(LOST_SERVERS):
        grid.add_storage_node(introduced=True)
    grid.announcements()  # the new servers are in the introducer cache blackmatch reads
    root = caps[""]

    status, report = bm_check(grid.client_dir, "deep-check", root)
    assert status == UNHEALTHY and "done: 6 objects checked, 1 healthy, 5 unhealthy" in report, report
    status, report = bm_check(grid.client_dir, "deep-check", "--repair", root)
    assert status == HEALTHY and " 5 repairs attempted, 5 successful, 0 failed" in report, report
    assert_tree_repaired(grid, caps, contents)

    for server in original[LOST_SERVERS : 2 * LOST_SERVERS]:
        grid.remove_storage_node(server)
    for path, data in contents.items():
        assert grid.tahoe("get", f"{root}/{path}").stdout == data


# --- 2. blackmatch uploads, Tahoe repairs, blackmatch verifies --------------------------------------------------
def test_tahoe_deep_repairs_blackmatch_tree(grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path) -> None:
    sdmf_node, mdmf_node = bm_nodes["sdmf"], bm_nodes["mdmf"]
    d = ("-d", str(sdmf_node))
    root = bm_text("mkdir", *d, "--format", "sdmf")
    contents = {
        "chk.bin": data_of(200_000, "deep-bm-chk"),
        "sdmf.bin": data_of(20000, "deep-bm-sdmf"),
        "sub/mdmf.bin": data_of(150_000, "deep-bm-mdmf"),
    }
    chk = bm_put(sdmf_node, tmp_path, contents["chk.bin"], f"{root}/chk.bin")
    sdmf = bm_put(sdmf_node, tmp_path, contents["sdmf.bin"], "--mutable", f"{root}/sdmf.bin")
    sub = bm_text("mkdir", *d, "--format", "mdmf", f"{root}/sub")
    mdmf = bm_put(mdmf_node, tmp_path, contents["sub/mdmf.bin"], "--mutable", f"{root}/sub/mdmf.bin")
    assert mdmf.startswith("URI:MDMF:") and sub.startswith("URI:DIR2-MDMF:")
    lost_chk = {cap: lose_shares(grid, cap) for cap in [root, chk, sdmf, sub, mdmf]}[chk]
    status, report = bm_check(sdmf_node, "deep-check", root)
    assert status == UNHEALTHY, report

    report = tahoe_text(grid, "deep-check", "--repair", root)
    assert " 5 repairs attempted, 5 successful, 0 failed" in report and " post-repair: 5 healthy, 0 unhealthy" in report
    assert_regenerated(grid, chk, lost_chk)  # Tahoe regenerates blackmatch's shares to the same bytes

    status, report = bm_check(sdmf_node, "deep-check", "--verify", root)
    assert status == HEALTHY and "done: 5 objects checked, 5 healthy, 0 unhealthy" in report, report
    for name, data in contents.items():
        assert bm("get", *d, f"{root}/{name}") == data


# --- 3. leases ---------------------------------------------------------------------------------------------------
def lease_expirations(share: Path) -> list[int]:
    """The expiry time of every lease on one share file (the four header slots of a mutable container)."""
    raw = share.read_bytes()
    if is_mutable_container(raw[:32]):
        slots = range(MUTABLE_HEADER.size, MUTABLE_HEADER.size + 4 * MUTABLE_LEASE.size, MUTABLE_LEASE.size)
        return [struct.unpack_from(">L", raw, at + 4)[0] for at in slots if struct.unpack_from(">L", raw, at)[0]]
    count = lease_count(share)
    return [struct.unpack_from(">L", raw, len(raw) - (i + 1) * IMMUTABLE_LEASE.size + 68)[0] for i in range(count)]


def expire_leases(share: Path, when: int) -> None:
    """Set the expiry time of the share's one lease to `when`, as if it had been added long ago."""
    raw = bytearray(share.read_bytes())
    if is_mutable_container(bytes(raw[:32])):
        struct.pack_into(">L", raw, MUTABLE_HEADER.size + 4, when)
    else:
        struct.pack_into(">L", raw, len(raw) - IMMUTABLE_LEASE.size + 68, when)
    share.write_bytes(bytes(raw))
    assert lease_expirations(share) == [when]


@pytest.mark.parametrize("mutable", [False, True], ids=["chk", "sdmf"])
def test_add_lease_renews_tahoes_lease(grid: TahoeGrid, bm_nodes: dict[str, Path], mutable: bool) -> None:
    """On Tahoe's client node directory, blackmatch's add-lease renews Tahoe's lease: the same secrets."""
    options = ("--mutable",) if mutable else ()
    same = tahoe_put(grid, data_of(20000, f"lease-renew-{mutable}"), *options)
    other = tahoe_put(grid, data_of(20000, f"lease-other-{mutable}"), *options)
    long_ago = int(time.time()) - 40 * 24 * 3600
    for path in share_paths(grid.storage_dirs, same):
        expire_leases(path, long_ago)

    renewed_after = int(time.time())
    status, report = bm_check(grid.client_dir, "check", "--add-lease", same)
    assert status == HEALTHY, report
    assert lease_counts(grid.storage_dirs, same) == [1] * TOTAL, "blackmatch added a lease: other secrets"
    for path in share_paths(grid.storage_dirs, same):
        (expiry,) = lease_expirations(path)
        assert expiry >= renewed_after + LEASE_DURATION, f"{path}: lease not renewed"

    status, report = bm_check(bm_nodes["sdmf"], "check", "--add-lease", other)  # the control
    assert status == HEALTHY, report
    assert lease_counts(grid.storage_dirs, other) == [2] * TOTAL
