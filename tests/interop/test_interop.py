"""blackmatch and Tahoe-LAFS 1.20.0 on the same grid: each reads, lists and changes what the other wrote.

Three directions, each against real Tahoe processes (`tahoe_grid.TahoeGrid`) and the real `blackmatch` command line:

1. blackmatch writes to Tahoe storage servers (from a node whose servers.yaml holds the introducer's announcements,
   and from the Tahoe client's own node directory used as is); Tahoe gets, lists and verifies every share of it,
   then changes blackmatch's mutable files and directories in place (its write enablers must match blackmatch's).
2. Tahoe writes (`put`, `put --mutable`, `--format=MDMF`, `mkdir`, `ln`); blackmatch `get`s and `ls`es it, changes
   Tahoe's directories (`put`, `mv`, `rm`, `mkdir`), and Tahoe sees the change and changes them again.
3. A Tahoe client that knows only `blackmatch storage run` servers stores, overwrites and reads everything on them;
   the shares are on the blackmatch servers' disks and blackmatch reads them too.

Lease secrets are checked directly: when blackmatch runs on the Tahoe client's node directory, `tahoe check
--add-lease` must renew blackmatch's lease rather than add a second one, which it only does if both derive the same
per-server secrets. One Tahoe grid serves directions 1 and 2; direction 3 has its own client and servers.

Each `tahoe` command costs a second of start-up, so after the CLI has done a thing once in a test, the test asks
the client node through its web API instead, which is what the CLI itself does (`tahoe ls --json` prints the
`?t=json` answer, `tahoe check --raw` the `t=check` one)."""

from __future__ import annotations

import configparser
import contextlib
import itertools
import json
import random
import struct
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import bootstrap
from lafs_core import base32
from lafs_core.caps import parse_cap
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.storage.containers import (
    IMMUTABLE_HEADER,
    MUTABLE_DATA_OFFSET,
    MUTABLE_HEADER,
    is_mutable_container,
    parse_mutable_header,
    parse_mutable_leases,
)

from ..storage_cluster import BLACKMATCH, REPO, StorageCluster
from .tahoe_grid import TahoeGrid

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
NEEDED, HAPPY, TOTAL = 3, 5, 10
LIT_MAX = 55  # Tahoe stores files of up to 55 bytes in the cap itself
MDMF_SEGMENT = 128 * 1024
COMMAND_TIMEOUT = 300
_uploads = itertools.count()


# --- running the two command lines ----------------------------------------------------------------------------
def bm_run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """`blackmatch ARGS` as a user runs it."""
    return subprocess.run(
        [*BLACKMATCH, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        cwd=REPO,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def bm(*args: str, stdin: bytes | None = None) -> bytes:
    """`blackmatch ARGS`; the test fails, showing stderr, unless it exits 0. Returns stdout."""
    done = bm_run(*args, stdin=stdin)
    assert done.returncode == 0, f"blackmatch {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def bm_text(*args: str) -> str:
    return bm(*args).decode().strip()


def bm_put(node: Path, tmp_path: Path, data: bytes, *args: str) -> str:
    """Upload `data` from a local file with `blackmatch put`; returns the cap it printed."""
    source = tmp_path / f"upload-{next(_uploads)}"
    source.write_bytes(data)
    cap = bm_text("put", "-d", str(node), *[a for a in args if a.startswith("--")], str(source), *target_of(args))
    parse_cap(cap)
    return cap


def target_of(args: tuple[str, ...]) -> list[str]:
    return [a for a in args if not a.startswith("--")]


def bm_ls(node: Path, path: str) -> list[str]:
    return bm_text("ls", "-d", str(node), path).splitlines()


def bm_ls_json(node: Path, path: str) -> Any:
    return json.loads(bm("ls", "-d", str(node), "--json", path))


def tahoe_text(grid: TahoeGrid, *args: str, input: bytes | None = None) -> str:
    return grid.tahoe(*args, input=input).stdout.decode().strip()


def tahoe_put(grid: TahoeGrid, data: bytes, *args: str) -> str:
    """`tahoe put [OPTIONS] - [TARGET]` with `data` on stdin; returns the cap Tahoe printed."""
    options = [a for a in args if a.startswith("--")]
    return tahoe_text(grid, "put", *options, "-", *target_of(args), input=data)


def tahoe_ls(grid: TahoeGrid, path: str) -> list[str]:
    return tahoe_text(grid, "ls", path).splitlines()


def tahoe_ls_json(grid: TahoeGrid, path: str) -> Any:
    return json.loads(grid.tahoe("ls", "--json", path).stdout)


# The same requests through the Tahoe client's web API, whose thin clients the CLI commands are.
def web_url(grid: TahoeGrid, path: str) -> str:
    """The web API URL of `CAP[/name/...]` (of `/uri` itself for "")."""
    return "/".join([f"{grid.client_url}uri", *(urllib.parse.quote(part, safe="") for part in path.split("/") if part)])


def web(grid: TahoeGrid, path: str, query: str = "", method: str = "GET", body: bytes | None = None) -> bytes:
    request = urllib.request.Request(web_url(grid, path) + query, data=body, method=method)
    with urllib.request.urlopen(request, timeout=COMMAND_TIMEOUT) as response:
        return response.read()


def web_json(grid: TahoeGrid, path: str) -> Any:
    """What `tahoe ls --json PATH` prints."""
    return json.loads(web(grid, path, "?t=json"))


def web_put(grid: TahoeGrid, path: str, data: bytes, query: str = "") -> str:
    """`tahoe put - [PATH]`: a new file (unlinked for ""), or new contents for a mutable file; returns the cap."""
    return web(grid, path, query, method="PUT", body=data).decode().strip()


def web_mkdir(grid: TahoeGrid, path: str = "", file_format: str = "SDMF") -> str:
    """`tahoe mkdir [--format=F] [PATH]`; returns the new directory's cap."""
    return web(grid, path, f"?t=mkdir&format={file_format}", method="POST").decode().strip()


def tahoe_check(grid: TahoeGrid, cap: str, *options: str) -> dict[str, Any]:
    """What `tahoe check --raw [--verify] [--add-lease] CAP` prints."""
    query = "".join(f"&{option}=true" for option in options)
    return json.loads(web(grid, cap, f"?t=check&output=JSON{query}", method="POST"))


def tahoe_verify(grid: TahoeGrid, cap: str) -> None:
    """`tahoe check --verify`: Tahoe downloads every share and checks every hash; all N must be good."""
    report = tahoe_check(grid, cap, "verify")
    results = report["results"]
    assert results["healthy"] is True, report
    assert results["count-shares-good"] == TOTAL, report
    assert results["count-corrupt-shares"] == 0, report
    assert results.get("count-recoverable-versions", 1) == 1, report


def tahoe_update(grid: TahoeGrid, cap: str, offset: int, data: bytes) -> None:
    """Tahoe's in-place MDMF update (`PUT /uri/CAP?offset=N`): it rewrites only the touched segments."""
    web(grid, cap, f"?offset={offset}", method="PUT", body=data)


def data_of(size: int, seed: str) -> bytes:
    """Reproducible bytes, different for every seed (so no two tests share a storage index)."""
    return random.Random(seed).randbytes(size)


def patched(data: bytes, offset: int, patch: bytes) -> bytes:
    return data[:offset] + patch + data[offset + len(patch) :]


# --- shares on disk ---------------------------------------------------------------------------------------------
def share_map(server_dirs: Iterable[Path], cap: str) -> dict[Path, set[int]]:
    """Server directory -> share numbers it holds for `cap` (Tahoe's and blackmatch's layout: storage/shares/)."""
    si = base32.encode(parse_cap(cap).storage_index)
    found: dict[Path, set[int]] = {}
    for server in server_dirs:
        bucket = server / "storage" / "shares" / si[:2] / si
        shnums = {int(p.name) for p in bucket.glob("*") if p.is_file() and p.name.isdigit()}
        if shnums:
            found[server] = shnums
    return found


def share_paths(server_dirs: Iterable[Path], cap: str) -> list[Path]:
    si = base32.encode(parse_cap(cap).storage_index)
    return [p for server in server_dirs for p in (server / "storage" / "shares" / si[:2] / si).glob("[0-9]*")]


def assert_all_shares(server_dirs: list[Path], cap: str, mutable: bool) -> None:
    """All N shares of `cap` are on these servers, spread over all of them, each in the right kind of container."""
    shares = share_map(server_dirs, cap)
    assert sorted(n for shnums in shares.values() for n in shnums) == list(range(TOTAL)), shares
    assert set(shares) == set(server_dirs), f"happiness {HAPPY} over {len(server_dirs)} servers: {shares}"
    for path in share_paths(server_dirs, cap):
        assert is_mutable_container(path.read_bytes()[:32]) == mutable, path


def lease_count(share: Path) -> int:
    """Leases on one share file, read from its container (Tahoe's layout, which blackmatch's store keeps)."""
    raw = share.read_bytes()
    if is_mutable_container(raw[:32]):
        header = parse_mutable_header(raw)
        slots = parse_mutable_leases(raw[MUTABLE_HEADER.size : MUTABLE_DATA_OFFSET])
        extra_at = header.extra_lease_offset
        extra = struct.unpack(">L", raw[extra_at : extra_at + 4])[0] if len(raw) >= extra_at + 4 else 0
        return len(slots) + extra
    return IMMUTABLE_HEADER.unpack(raw[: IMMUTABLE_HEADER.size])[2]


def lease_counts(server_dirs: Iterable[Path], cap: str) -> list[int]:
    counts = [lease_count(p) for p in share_paths(server_dirs, cap)]
    assert len(counts) == TOTAL
    return counts


# --- node directories -------------------------------------------------------------------------------------------
def make_node(path: Path, servers_files: list[Path], mutable_format: str | None = None) -> Path:
    """`blackmatch create-node` on these servers; it also makes the node's root directory on them."""
    servers = [arg for f in servers_files for arg in ("--servers", str(f))]
    bm("create-node", str(path), *servers, "--needed", str(NEEDED), "--happy", str(HAPPY), "--total", str(TOTAL))
    assert NodeDirectory(path).aliases()["tahoe"].startswith("URI:DIR2:"), "create-node made no root directory"
    if mutable_format is not None:
        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(path / "tahoe.cfg", encoding="utf-8")
        cfg.set("client", "mutable.format", mutable_format)
        with (path / "tahoe.cfg").open("w", encoding="utf-8") as f:
            cfg.write(f)
    return path


@pytest.fixture(scope="module")
def tahoe_exe() -> Path:
    return bootstrap.ensure_tahoe_venv()


@pytest.fixture(scope="module")
def grid(tahoe_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TahoeGrid]:
    """Introducer, five Tahoe storage nodes and a Tahoe client, k=3 happy=5 N=10."""
    base = tmp_path_factory.mktemp("tahoe-grid")
    with TahoeGrid(base, tahoe_exe, num_storage=5, needed=NEEDED, happy=HAPPY, total=TOTAL) as running:
        yield running


def make_nodes_on(grid: TahoeGrid, base: Path) -> dict[str, Path]:
    """blackmatch node directories on the Tahoe storage servers, by mutable format (their own secrets, not Tahoe's).

    Their servers.yaml holds the introducer's announcements unchanged, as a user would copy them.
    """
    servers = base / "servers.yaml"
    anns = {a["server_id"]: {"ann": a["ann"]} for a in grid.announcements()}
    servers.write_text(yaml.safe_dump({"storage": anns}), encoding="utf-8")
    return {
        "sdmf": make_node(base / "sdmf-node", [servers]),
        "mdmf": make_node(base / "mdmf-node", [servers], mutable_format="mdmf"),
    }


@pytest.fixture(scope="module")
def bm_nodes(grid: TahoeGrid, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_nodes_on(grid, tmp_path_factory.mktemp("blackmatch-nodes"))


# --- 1. blackmatch writes, Tahoe reads ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, LIT_MAX, LIT_MAX + 1, 5000, 2 * MiB, 3 * MiB + 12345])
def test_blackmatch_immutable_read_by_tahoe(grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path, size: int):
    data = data_of(size, f"bm-immutable-{size}")
    cap = bm_put(bm_nodes["sdmf"], tmp_path, data)
    if size <= LIT_MAX:
        assert cap.startswith("URI:LIT:")
    else:
        assert cap.startswith("URI:CHK:") and cap.endswith(f":{NEEDED}:{TOTAL}:{size}")
        assert_all_shares(grid.storage_dirs, cap, mutable=False)
        tahoe_verify(grid, cap)
    assert grid.tahoe("get", cap).stdout == data


def test_blackmatch_on_tahoe_client_node_directory(grid: TahoeGrid, tmp_path: Path) -> None:
    """blackmatch used with the Tahoe client's own node directory: its servers, convergence secret and aliases."""
    client = grid.client_dir
    for size in (5000, MiB + 1):
        data = data_of(size, f"tahoe-node-dir-{size}")
        cap = bm_put(client, tmp_path, data)
        # the same convergence secret: Tahoe derives the very same cap only if the encoding is byte-identical
        assert tahoe_put(grid, data) == cap

    grid.tahoe("create-alias", "interop")
    from_bm = data_of(3000, "alias-from-blackmatch")
    bm_put(client, tmp_path, from_bm, "interop:from-blackmatch.bin")
    tahoe_put(grid, b"from tahoe\n", "interop:from-tahoe.txt")
    assert tahoe_ls(grid, "interop:") == ["from-blackmatch.bin", "from-tahoe.txt"]
    assert bm_ls(client, "interop:") == ["from-blackmatch.bin", "from-tahoe.txt"]
    assert grid.tahoe("get", "interop:from-blackmatch.bin").stdout == from_bm
    assert bm("get", "-d", str(client), "interop:from-tahoe.txt") == b"from tahoe\n"


def test_lease_secrets_match_tahoe(grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path) -> None:
    """Tahoe renews, rather than adds to, the leases blackmatch set with the same node secret: same derivation."""
    same_secret = [
        bm_put(grid.client_dir, tmp_path, data_of(20000, "lease-same-immutable")),
        bm_put(grid.client_dir, tmp_path, data_of(2000, "lease-same-mutable"), "--mutable"),
    ]
    other_secret = [
        bm_put(bm_nodes["sdmf"], tmp_path, data_of(20000, "lease-other-immutable")),
        bm_put(bm_nodes["sdmf"], tmp_path, data_of(2000, "lease-other-mutable"), "--mutable"),
    ]
    for cap in same_secret + other_secret:
        assert lease_counts(grid.storage_dirs, cap) == [1] * TOTAL
        assert tahoe_check(grid, cap, "add-lease")["results"]["healthy"] is True
    for cap in same_secret:
        assert lease_counts(grid.storage_dirs, cap) == [1] * TOTAL, f"Tahoe added a lease: other secrets for {cap}"
    for cap in other_secret:  # the control: another client's secrets do add a lease
        assert lease_counts(grid.storage_dirs, cap) == [2] * TOTAL


@pytest.mark.parametrize(("file_format", "size"), [("sdmf", 20000), ("mdmf", 3 * MDMF_SEGMENT + 1000)])
def test_blackmatch_mutable_read_and_changed_by_tahoe(
    grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path, file_format: str, size: int
) -> None:
    node = bm_nodes[file_format]
    data = data_of(size, f"bm-mutable-{file_format}")
    cap = bm_put(node, tmp_path, data, "--mutable")
    assert cap.startswith({"sdmf": "URI:SSK:", "mdmf": "URI:MDMF:"}[file_format])
    assert_all_shares(grid.storage_dirs, cap, mutable=True)
    assert grid.tahoe("get", cap).stdout == data
    tahoe_verify(grid, cap)

    kind, info = web_json(grid, cap)
    assert kind == "filenode" and info["mutable"] is True and info["format"] == file_format.upper()
    assert info["size"] == size and info["rw_uri"] == cap
    mine = bm_ls_json(node, cap)[1]
    uris = ("rw_uri", "ro_uri", "verify_uri")
    assert {k: mine[k] for k in uris} == {k: info[k] for k in uris}
    assert bm("get", "-d", str(node), info["ro_uri"]) == data

    # Tahoe overwrites blackmatch's file: the Tahoe servers accept its write enabler
    new = data_of(size + 777, f"bm-mutable-{file_format}-v2")
    assert tahoe_put(grid, new, cap) == cap
    if file_format == "mdmf":  # Tahoe's segment-wise update works from blackmatch's block hash trees
        assert bm("get", "-d", str(node), cap) == new
        patch = data_of(3000, "mdmf-patch")
        tahoe_update(grid, cap, MDMF_SEGMENT - 1000, patch)  # across a segment boundary
        new = patched(new, MDMF_SEGMENT - 1000, patch)
        tail = data_of(5000, "mdmf-append")
        tahoe_update(grid, cap, len(new) - 10, tail)  # grows the file
        new = new[:-10] + tail
    assert bm("get", "-d", str(node), cap) == new
    tahoe_verify(grid, cap)


def test_blackmatch_directories_read_and_changed_by_tahoe(
    grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path
) -> None:
    """An SDMF directory holding an MDMF one, both made and filled by blackmatch, then changed by each in turn."""
    node = bm_nodes["sdmf"]
    d = ("-d", str(node))
    root = bm_text("mkdir", *d)
    assert root.startswith("URI:DIR2:")
    lit = bm_put(node, tmp_path, b"tiny\n", f"{root}/lit.txt")
    doc_data = data_of(5000, "dir-doc")
    doc = bm_put(node, tmp_path, doc_data, f"{root}/doc.bin")
    sub = bm_text("mkdir", *d, "--format", "mdmf", f"{root}/sub")
    assert sub.startswith("URI:DIR2-MDMF:")
    mut_data = data_of(70000, "dir-mutable")
    mut = bm_put(node, tmp_path, mut_data, "--mutable", f"{root}/sub/mut.bin")
    bm("ln", *d, f"{root}/doc.bin", f"{root}/sub/doc-link.bin")

    assert tahoe_ls(grid, root) == ["doc.bin", "lit.txt", "sub"]
    listing = tahoe_ls_json(grid, root)
    kind, info = listing
    assert kind == "dirnode" and info["rw_uri"] == root
    children = info["children"]
    assert children["lit.txt"][0] == "filenode" and children["lit.txt"][1]["ro_uri"] == lit
    assert children["doc.bin"][1]["ro_uri"] == doc and children["doc.bin"][1]["size"] == 5000
    assert children["sub"][0] == "dirnode" and children["sub"][1]["rw_uri"] == sub
    assert bm_ls_json(node, root) == listing  # down to the link times
    sub_children = web_json(grid, f"{root}/sub")[1]["children"]
    assert sorted(sub_children) == ["doc-link.bin", "mut.bin"]
    assert sub_children["mut.bin"][1]["rw_uri"] == mut and sub_children["mut.bin"][1]["mutable"] is True
    assert sub_children["doc-link.bin"][1]["ro_uri"] == doc
    assert web(grid, f"{root}/sub/mut.bin") == mut_data
    tahoe_verify(grid, root)
    tahoe_verify(grid, sub)

    # Tahoe changes both directories and the mutable file (in place); blackmatch sees it
    from_tahoe = data_of(900, "dir-from-tahoe")
    web_put(grid, f"{root}/sub/from-tahoe.bin", from_tahoe)
    grid.tahoe("mv", f"{root}/lit.txt", f"{root}/sub/lit-moved.txt")
    grid.tahoe("unlink", f"{root}/doc.bin")
    assert web_put(grid, f"{root}/sub/mut.bin", b"rewritten by tahoe\n") == mut
    assert bm_ls(node, root) == ["sub"]
    sub_listing = web_json(grid, f"{root}/sub")
    assert sorted(sub_listing[1]["children"]) == ["doc-link.bin", "from-tahoe.bin", "lit-moved.txt", "mut.bin"]
    assert bm_ls_json(node, f"{root}/sub") == sub_listing
    assert bm("get", *d, f"{root}/sub/from-tahoe.bin") == from_tahoe
    assert bm("get", *d, mut) == b"rewritten by tahoe\n"

    # and blackmatch changes them again, over the versions Tahoe published
    bm("rm", *d, f"{root}/sub/doc-link.bin")
    bm_put(node, tmp_path, b"after tahoe\n", f"{root}/after.txt")
    assert sorted(web_json(grid, root)[1]["children"]) == ["after.txt", "sub"]
    assert "doc-link.bin" not in web_json(grid, f"{root}/sub")[1]["children"]


# --- 2. Tahoe writes, blackmatch reads ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 40, 5000, 3 * MiB + 7])
def test_tahoe_immutable_read_by_blackmatch(grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path, size: int):
    node = bm_nodes["sdmf"]
    data = data_of(size, f"tahoe-immutable-{size}")
    cap = tahoe_put(grid, data)
    assert cap.startswith("URI:LIT:" if size <= LIT_MAX else "URI:CHK:")
    local = tmp_path / "download.bin"
    bm("get", "-d", str(node), cap, str(local))
    assert local.read_bytes() == data
    assert bm_ls_json(node, cap) == web_json(grid, cap)


@pytest.mark.parametrize(("file_format", "size"), [("sdmf", 30000), ("mdmf", 2 * MDMF_SEGMENT + 5)])
def test_tahoe_mutable_read_by_blackmatch(
    grid: TahoeGrid, bm_nodes: dict[str, Path], file_format: str, size: int
) -> None:
    node = bm_nodes["sdmf"]
    data = data_of(size, f"tahoe-mutable-{file_format}")
    cap = tahoe_put(grid, data, "--mutable" if file_format == "sdmf" else "--format=MDMF")
    assert cap.startswith({"sdmf": "URI:SSK:", "mdmf": "URI:MDMF:"}[file_format])
    assert bm("get", "-d", str(node), cap) == data
    ro_cap = web_json(grid, cap)[1]["ro_uri"]
    new = data_of(size // 2, f"tahoe-mutable-{file_format}-v2")
    assert web_put(grid, cap, new) == cap
    assert bm("get", "-d", str(node), ro_cap) == new


def test_tahoe_directories_read_and_changed_by_blackmatch(
    grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path
) -> None:
    """An SDMF directory holding an MDMF one, both made and filled by Tahoe, then changed by each in turn."""
    node = bm_nodes["sdmf"]
    d = ("-d", str(node))
    root = tahoe_text(grid, "mkdir")
    assert root.startswith("URI:DIR2:")
    a_data = data_of(5000, "tahoe-dir-a")
    a = tahoe_put(grid, a_data, f"{root}/a.bin")
    sub = tahoe_text(grid, "mkdir", "--format=MDMF", f"{root}/sub")
    assert sub.startswith("URI:DIR2-MDMF:")
    m_data = data_of(2500, "tahoe-dir-m")
    web_put(grid, f"{root}/sub/m.txt", m_data, "?format=SDMF")
    grid.tahoe("ln", f"{root}/a.bin", f"{root}/sub/a-link.bin")

    assert bm_ls(node, root) == ["a.bin", "sub"]
    assert bm_ls_json(node, root) == tahoe_ls_json(grid, root)
    sub_listing = web_json(grid, f"{root}/sub")
    assert sub_listing[1]["children"]["m.txt"][1]["format"] == "SDMF"
    assert bm_ls_json(node, f"{root}/sub") == sub_listing
    assert bm("get", *d, f"{root}/sub/m.txt") == m_data
    assert bm("get", *d, f"{root}/sub/a-link.bin") == a_data

    # blackmatch changes Tahoe's directories: the Tahoe servers accept blackmatch's write enabler
    from_bm_data = data_of(6000, "bm-into-tahoe-dir")
    from_bm = bm_put(node, tmp_path, from_bm_data, f"{root}/from-bm.bin")
    bm("mv", *d, f"{root}/a.bin", f"{root}/sub/a-moved.bin")
    bm("rm", *d, f"{root}/sub/a-link.bin")
    bm_dir = bm_text("mkdir", *d, f"{root}/bm-dir")
    assert tahoe_ls(grid, root) == ["bm-dir", "from-bm.bin", "sub"]
    children = web_json(grid, root)[1]["children"]
    assert children["from-bm.bin"][1]["ro_uri"] == from_bm and children["bm-dir"][1]["rw_uri"] == bm_dir
    sub_children = web_json(grid, f"{root}/sub")[1]["children"]
    assert sorted(sub_children) == ["a-moved.bin", "m.txt"] and sub_children["a-moved.bin"][1]["ro_uri"] == a
    assert grid.tahoe("get", f"{root}/from-bm.bin").stdout == from_bm_data

    # and Tahoe again, over the versions blackmatch published
    web_put(grid, f"{root}/bm-dir/after.txt", b"after blackmatch\n")
    web(grid, f"{root}/from-bm.bin", method="DELETE")
    web(grid, f"{root}/sub/m.txt", method="DELETE")
    assert bm_ls(node, root) == ["bm-dir", "sub"]
    assert bm_ls(node, f"{root}/sub") == ["a-moved.bin"]
    assert bm("get", *d, f"{root}/bm-dir/after.txt") == b"after blackmatch\n"


def test_tahoe_immutable_directories_read_by_blackmatch(
    grid: TahoeGrid, bm_nodes: dict[str, Path], tmp_path: Path
) -> None:
    """`tahoe backup` snapshots are immutable directories (DIR2-CHK, DIR2-LIT for empty ones)."""
    node = bm_nodes["sdmf"]
    d = ("-d", str(node))
    source = tmp_path / "backup-source"
    (source / "sub").mkdir(parents=True)
    (source / "empty").mkdir()
    big = data_of(300_000, "backup-big")
    (source / "sub" / "big.bin").write_bytes(big)
    (source / "small.txt").write_bytes(b"small\n")
    target = web_mkdir(grid)
    grid.tahoe("backup", str(source), f"{target}/")
    latest = f"{target}/Latest"
    snapshot = web_json(grid, latest)
    assert snapshot[0] == "dirnode" and snapshot[1]["ro_uri"].startswith("URI:DIR2-CHK:")
    assert bm_ls(node, latest) == ["empty", "small.txt", "sub"]
    for path in (latest, f"{latest}/sub", f"{latest}/empty"):
        assert bm_ls_json(node, path) == web_json(grid, path)
    assert web_json(grid, f"{latest}/empty")[1]["ro_uri"] == "URI:DIR2-LIT:"
    assert bm("get", *d, f"{latest}/sub/big.bin") == big
    assert bm("get", *d, f"{latest}/small.txt") == b"small\n"
    # an immutable directory cannot change: blackmatch refuses, and the snapshot stays as it was
    source_file = tmp_path / "new.txt"
    source_file.write_bytes(b"new\n")
    refused = bm_run("put", *d, str(source_file), f"{latest}/new.txt")
    assert refused.returncode == 1 and b"read-only" in refused.stderr
    assert bm_run("rm", *d, f"{latest}/small.txt").returncode == 1
    assert sorted(web_json(grid, latest)[1]["children"]) == ["empty", "small.txt", "sub"]


# --- 3. a Tahoe client on blackmatch storage servers only ---------------------------------------------------------
@pytest.fixture(scope="class")
def bm_grid(tahoe_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StorageCluster, TahoeGrid]]:
    """Five `blackmatch storage run` servers, and a Tahoe client (introducer, no Tahoe storage) that uses them."""
    base = tmp_path_factory.mktemp("blackmatch-servers")
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(StorageCluster(base / "servers", 5))
        tahoe = stack.enter_context(
            TahoeGrid(base / "tahoe", tahoe_exe, num_storage=0, needed=NEEDED, happy=HAPPY, total=TOTAL)
        )
        entries: dict[str, Any] = {}
        for servers_file in cluster.servers_files:
            entries.update(yaml.safe_load(servers_file.read_text(encoding="utf-8"))["storage"])
        tahoe.add_static_servers(entries)
        yield cluster, tahoe


@pytest.fixture(scope="class")
def bm_client(bm_grid: tuple[StorageCluster, TahoeGrid], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blackmatch node on the blackmatch servers, with its own secrets."""
    cluster, _ = bm_grid
    return make_node(tmp_path_factory.mktemp("bm-client") / "node", cluster.servers_files)


def server_dirs(cluster: StorageCluster) -> list[Path]:
    return [server.path for server in cluster.servers]


class TestTahoeOnBlackmatchServers:
    def test_tahoe_uses_only_blackmatch_servers(self, bm_grid: tuple[StorageCluster, TahoeGrid]) -> None:
        cluster, tahoe = bm_grid
        # exactly "connected": the status Tahoe's welcome page gives a GBS (HTTP) server
        assert tahoe.server_statuses() == {server.server_id: "connected" for server in cluster.servers}

    @pytest.mark.parametrize("size", [5000, 3 * MiB + 333])
    def test_tahoe_immutable(self, bm_grid: tuple[StorageCluster, TahoeGrid], bm_client: Path, size: int) -> None:
        cluster, tahoe = bm_grid
        data = data_of(size, f"on-bm-servers-immutable-{size}")
        cap = tahoe_put(tahoe, data)
        assert cap.startswith("URI:CHK:")
        assert_all_shares(server_dirs(cluster), cap, mutable=False)
        assert tahoe.tahoe("get", cap).stdout == data
        tahoe_verify(tahoe, cap)
        assert bm("get", "-d", str(bm_client), cap) == data

    @pytest.mark.parametrize(("file_format", "size"), [("sdmf", 40000), ("mdmf", 3 * MDMF_SEGMENT + 17)])
    def test_tahoe_mutable(
        self, bm_grid: tuple[StorageCluster, TahoeGrid], bm_client: Path, file_format: str, size: int
    ) -> None:
        cluster, tahoe = bm_grid
        data = data_of(size, f"on-bm-servers-mutable-{file_format}")
        cap = tahoe_put(tahoe, data, "--mutable" if file_format == "sdmf" else "--format=MDMF")
        assert_all_shares(server_dirs(cluster), cap, mutable=True)
        assert web(tahoe, cap) == data
        # overwrite: Tahoe's test-and-set writes, with its write enabler, against the blackmatch servers
        new = data_of(size + 4321, f"on-bm-servers-mutable-{file_format}-v2")
        assert tahoe_put(tahoe, new, cap) == cap
        if file_format == "mdmf":
            patch = data_of(2000, "on-bm-servers-patch")
            tahoe_update(tahoe, cap, 2 * MDMF_SEGMENT - 500, patch)
            new = patched(new, 2 * MDMF_SEGMENT - 500, patch)
        assert tahoe.tahoe("get", cap).stdout == new
        tahoe_verify(tahoe, cap)
        assert bm("get", "-d", str(bm_client), cap) == new

    def test_tahoe_directories(
        self, bm_grid: tuple[StorageCluster, TahoeGrid], bm_client: Path, tmp_path: Path
    ) -> None:
        cluster, tahoe = bm_grid
        d = ("-d", str(bm_client))
        root = tahoe_text(tahoe, "mkdir")
        assert_all_shares(server_dirs(cluster), root, mutable=True)
        a_data = data_of(7000, "on-bm-servers-dir-a")
        tahoe_put(tahoe, a_data, f"{root}/a.bin")
        web_mkdir(tahoe, f"{root}/sub", "MDMF")
        web_put(tahoe, f"{root}/sub/m.txt", b"mutable in sub\n", "?format=MDMF")
        assert tahoe_ls(tahoe, root) == ["a.bin", "sub"]
        assert bm_ls_json(bm_client, root) == web_json(tahoe, root)
        assert bm("get", *d, f"{root}/sub/m.txt") == b"mutable in sub\n"

        # blackmatch writes into Tahoe's directories on blackmatch servers, then Tahoe again
        bm_put(bm_client, tmp_path, b"from blackmatch\n", f"{root}/sub/from-bm.txt")
        bm("mv", *d, f"{root}/a.bin", f"{root}/sub/a.bin")
        assert tahoe_ls(tahoe, f"{root}/sub") == ["a.bin", "from-bm.txt", "m.txt"]
        assert sorted(web_json(tahoe, root)[1]["children"]) == ["sub"]
        tahoe.tahoe("unlink", f"{root}/sub/m.txt")
        assert bm_ls(bm_client, f"{root}/sub") == ["a.bin", "from-bm.txt"]
        assert bm("get", *d, f"{root}/sub/a.bin") == a_data

    def test_blackmatch_writes_tahoe_reads(
        self, bm_grid: tuple[StorageCluster, TahoeGrid], bm_client: Path, tmp_path: Path
    ) -> None:
        cluster, tahoe = bm_grid
        d = ("-d", str(bm_client))
        data = data_of(2 * MiB + 99, "bm-on-bm-servers-immutable")
        root = bm_text("mkdir", *d)
        cap = bm_put(bm_client, tmp_path, data, f"{root}/big.bin")
        assert_all_shares(server_dirs(cluster), cap, mutable=False)
        mut = bm_put(bm_client, tmp_path, b"blackmatch wrote this\n", "--mutable", f"{root}/m.txt")
        assert_all_shares(server_dirs(cluster), mut, mutable=True)
        assert tahoe_ls(tahoe, root) == ["big.bin", "m.txt"]
        assert tahoe.tahoe("get", f"{root}/big.bin").stdout == data
        tahoe_verify(tahoe, cap)
        assert web(tahoe, f"{root}/m.txt") == b"blackmatch wrote this\n"
        assert web_put(tahoe, mut, b"tahoe rewrote this\n") == mut
        web_put(tahoe, f"{root}/t.txt", b"added by tahoe\n")
        assert bm("get", *d, mut) == b"tahoe rewrote this\n"
        assert bm_ls(bm_client, root) == ["big.bin", "m.txt", "t.txt"]

        # the share files are Tahoe's containers: Tahoe's own share dumper reads them
        immutable_dump = tahoe_text(tahoe, "debug", "dump-share", str(share_paths(server_dirs(cluster), cap)[0]))
        assert f"file_size: {len(data)}" in immutable_dump and "total_shares: 10" in immutable_dump
        mutable_dump = tahoe_text(tahoe, "debug", "dump-share", str(share_paths(server_dirs(cluster), mut)[0]))
        assert "Mutable slot found" in mutable_dump and "share_type: SDMF" in mutable_dump

    def test_lease_secrets(self, bm_grid: tuple[StorageCluster, TahoeGrid], bm_client: Path, tmp_path: Path) -> None:
        """Tahoe's add-lease on blackmatch servers renews a lease set with the same secrets, else adds one."""
        cluster, tahoe = bm_grid
        servers = server_dirs(cluster)
        same_secret = [  # blackmatch on the Tahoe client's node directory (servers from its servers.yaml)
            bm_put(tahoe.client_dir, tmp_path, data_of(30000, "bm-servers-lease-same")),
            bm_put(tahoe.client_dir, tmp_path, data_of(3000, "bm-servers-lease-same-m"), "--mutable"),
        ]
        other_secret = [
            bm_put(bm_client, tmp_path, data_of(30000, "bm-servers-lease-other")),
            bm_put(bm_client, tmp_path, data_of(3000, "bm-servers-lease-other-m"), "--mutable"),
        ]
        for cap in same_secret + other_secret:
            assert lease_counts(servers, cap) == [1] * TOTAL
            assert tahoe_check(tahoe, cap, "add-lease")["results"]["healthy"] is True
        for cap in same_secret:
            assert lease_counts(servers, cap) == [1] * TOTAL
        for cap in other_secret:
            assert lease_counts(servers, cap) == [2] * TOTAL
