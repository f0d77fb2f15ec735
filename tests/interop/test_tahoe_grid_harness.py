"""The real-Tahoe grid harness itself works: nodes start, the reference client stores and reads, servers speak GBS.

The other interop tests build on these facts, so a failure here points at the harness or the Tahoe install, not at
blackmatch. One grid serves the whole module (starting one costs several seconds); the static-server test changes
the client's server list, so it runs last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import bootstrap

from .tahoe_grid import TahoeGrid, storage_announcement

pytestmark = pytest.mark.interop


@pytest.fixture(scope="session")
def tahoe_exe() -> Path:
    return bootstrap.ensure_tahoe_venv()


@pytest.fixture(scope="module")
def grid(tahoe_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TahoeGrid]:
    with TahoeGrid(tmp_path_factory.mktemp("tahoe-grid"), tahoe_exe, num_storage=5, needed=3, happy=5, total=10) as g:
        yield g


def share_count(storage_dir: Path) -> int:
    shares = storage_dir / "storage" / "shares"
    return sum(1 for p in shares.glob("*/*/*") if p.is_file() and "incoming" not in p.parts)


def test_put_get_roundtrip(grid: TahoeGrid) -> None:
    data = os.urandom(1 << 20)
    (grid.base_dir / "random.bin").write_bytes(data)
    cap = grid.tahoe("put", str(grid.base_dir / "random.bin")).stdout.decode().strip()
    assert cap.startswith("URI:CHK:") and cap.endswith(":3:10:1048576")
    assert grid.tahoe("get", cap).stdout == data
    assert sum(share_count(d) for d in grid.storage_dirs) >= 10  # N=10 shares over the 5 servers


def test_put_from_stdin(grid: TahoeGrid) -> None:
    cap = grid.tahoe("put", input=b"small, so a LIT cap").stdout.decode().strip()
    assert cap.startswith("URI:LIT:")
    assert grid.tahoe("get", cap).stdout == b"small, so a LIT cap"


def test_mkdir_and_ls(grid: TahoeGrid) -> None:
    dircap = grid.tahoe("mkdir").stdout.decode().strip()
    assert dircap.startswith("URI:DIR2:")
    kind, info = json.loads(grid.tahoe("ls", "--json", dircap).stdout)
    assert kind == "dirnode"
    assert info["rw_uri"] == dircap and info["children"] == {} and info["mutable"] is True
    grid.tahoe("create-alias", "tahoe")
    grid.tahoe("put", "-", "tahoe:hello.txt", input=b"hello, grid\n")
    kind, info = json.loads(grid.tahoe("ls", "--json", "tahoe:").stdout)
    assert list(info["children"]) == ["hello.txt"]


def test_announcements(grid: TahoeGrid) -> None:
    anns = grid.announcements()
    assert len(anns) == 5
    assert len({a["server_id"] for a in anns}) == 5
    for entry in anns:
        ann = entry["ann"]
        assert entry["server_id"].startswith("v0-")
        assert ann["anonymous-storage-FURL"].startswith("pb://")
        assert ann["nickname"].startswith("storage-")
        assert ann["permutation-seed-base32"]
        nurls = ann["anonymous-storage-NURLs"]
        assert nurls and all(n.startswith("pb://") and "#v=1" in n for n in nurls)


def test_client_uses_http_storage(grid: TahoeGrid) -> None:
    # "connected" is the HTTP (GBS) client's status; Foolscap's reads "Connected to tcp:... via tcp"
    statuses = grid.server_statuses()
    assert {sid: statuses[sid] for sid in grid.expected_server_ids()} == dict.fromkeys(
        grid.expected_server_ids(), "connected"
    )


def test_storage_announcement_matches_introducer(grid: TahoeGrid) -> None:
    by_id = {a["server_id"]: a["ann"] for a in grid.announcements()}
    for node_dir in grid.storage_dirs:
        mine = storage_announcement(node_dir)
        theirs = by_id[mine["server_id"]]
        for key, value in mine["ann"].items():
            assert theirs[key] == value, key


def test_static_server_without_furl_is_refused(grid: TahoeGrid) -> None:
    nurl_only = {"ann": {"anonymous-storage-NURLs": grid.announcements()[0]["ann"]["anonymous-storage-NURLs"]}}
    with pytest.raises(ValueError, match="FURL"):
        grid.add_static_servers({"nurl-only": nurl_only})


def test_static_http_server_gets_shares(grid: TahoeGrid) -> None:
    """What a blackmatch GBS server will go through: known to the Tahoe client only from servers.yaml."""
    extra = grid.add_storage_node(introduced=False)
    entry = storage_announcement(extra)
    grid.add_static_servers({entry["server_id"]: {"ann": entry["ann"]}})
    assert grid.server_statuses()[entry["server_id"]] == "connected"
    assert len(grid.expected_server_ids()) == 6

    data = os.urandom(3 << 20)
    (grid.base_dir / "random3.bin").write_bytes(data)
    cap = grid.tahoe("put", str(grid.base_dir / "random3.bin")).stdout.decode().strip()
    assert share_count(extra) >= 1  # 10 shares over 6 servers: the uploader spreads them over all
    assert grid.tahoe("get", cap).stdout == data
