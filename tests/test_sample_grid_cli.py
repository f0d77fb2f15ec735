"""The command line on the grid real Tahoe-LAFS 1.20.0 wrote: its five share trees (copied) as local servers.

`blackmatch get` must read every cap of caps.txt byte-exact and `blackmatch ls` must list the directories as
`tahoe ls` did (root-listing.json, sub-mdmf-listing.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .shared_data import SAMPLE_GRID, sample_caps, sample_plaintext
from .storage_cluster import blackmatch

DIRECTORIES = {"root": "root-listing.json", "sub-mdmf": "sub-mdmf-listing.json"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("sample-grid")
    servers = []
    for server in sorted((SAMPLE_GRID / "servers").iterdir()):
        shutil.copytree(server, root / server.name)
        servers += ["--local-server", str(root / server.name)]
    blackmatch("create-node", str(root / "node"), *servers)
    return str(root / "node")


@pytest.mark.parametrize("name", sorted(set(sample_caps()) - {"root", "sub-mdmf", "imm-dir"}))
def test_get_every_file_cap(node: str, name: str, tmp_path: Path) -> None:
    cap = sample_caps()[name]
    assert blackmatch("get", "-d", node, cap).stdout == sample_plaintext(name)
    blackmatch("get", "-d", node, cap, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == sample_plaintext(name)


@pytest.mark.parametrize("name", sorted(DIRECTORIES))
def test_ls_lists_like_tahoe(node: str, name: str) -> None:
    cap = sample_caps()[name]
    expected = json.loads((SAMPLE_GRID / DIRECTORIES[name]).read_text())
    names = blackmatch("ls", "-d", node, cap).stdout.decode().splitlines()
    assert names == sorted(expected[1]["children"])
    listed = json.loads(blackmatch("ls", "-d", node, "--json", cap).stdout)
    assert listed[0] == "dirnode"
    assert listed[1]["children"] == expected[1]["children"]
    long_lines = blackmatch("ls", "-d", node, "-l", cap).stdout.decode().splitlines()
    assert [line.split(maxsplit=5)[-1] for line in long_lines] == names


def test_immutable_directory_and_paths_through_directories(node: str) -> None:
    caps = sample_caps()
    names = blackmatch("ls", "-d", node, caps["imm-dir"]).stdout.decode().splitlines()
    assert names
    root_children = json.loads((SAMPLE_GRID / DIRECTORIES["root"]).read_text())[1]["children"]
    for child, (kind, _info) in root_children.items():
        if kind == "filenode" and child in caps:
            assert blackmatch("get", "-d", node, f"{caps['root']}/{child}").stdout == sample_plaintext(child)
    sub = json.loads((SAMPLE_GRID / DIRECTORIES["sub-mdmf"]).read_text())[1]["children"]
    for child, (kind, _info) in sub.items():
        if kind == "filenode":
            assert blackmatch("get", "-d", node, f"{caps['sub-mdmf']}/{child}").returncode == 0


def test_readonly_directory_refuses_changes(node: str) -> None:
    listing = json.loads((SAMPLE_GRID / DIRECTORIES["root"]).read_text())
    readonly = blackmatch("ls", "-d", node, "--json", sample_caps()["root"]).stdout
    ro_uri = json.loads(readonly)[1]["ro_uri"]
    failed = blackmatch("rm", "-d", node, f"{ro_uri}/chk-1k", check=False)
    assert failed.returncode == 1 and b"read-only" in failed.stderr
    assert blackmatch("ls", "-d", node, ro_uri).stdout.decode().splitlines() == sorted(listing[1]["children"])


@pytest.mark.parametrize("name", sorted(sample_caps()))
def test_check_and_verify_call_tahoes_objects_healthy(node: str, name: str) -> None:
    cap = sample_caps()[name]
    for options in ([], ["--verify"]):
        done = blackmatch("check", "-d", node, *options, cap, check=False)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        summary = "Summary: Healthy (LIT)" if name.startswith("lit-") else "Summary: Healthy"
        assert done.stdout.decode().splitlines()[0] == summary


def test_deep_check_verifies_tahoes_tree(node: str) -> None:
    done = blackmatch("deep-check", "-d", node, "--verify", sample_caps()["root"], check=False)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    listed = json.loads((SAMPLE_GRID / DIRECTORIES["root"]).read_text())[1]["children"]
    assert lines[0] == "<root>: Healthy" and len(lines) > len(listed)
    assert all(line.endswith(("Healthy", "Healthy (LIT)")) for line in lines[:-2])
    assert lines[-1] == " 0 unrecoverable"
