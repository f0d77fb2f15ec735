"""The checker over in-process local share stores: Tahoe's verdicts for CHK, SDMF, MDMF, LIT and directories, with
shares missing or corrupted on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lafs_core import base32
from lafs_core.caps import Cap, ChkCap, LiteralCap, MutableWriteCap
from lafs_core.errors import LafsError
from lafs_core.fetch import bytes_reader, drive
from lafs_core.grid.checker import CheckResult, check
from lafs_core.grid.directory import create_directory
from lafs_core.grid.grid import Grid
from lafs_core.grid.mutable_io import create_mutable
from lafs_core.grid.upload import bytes_chunks, upload_immutable
from lafs_core.immutable.decode import ChkReader
from lafs_core.immutable.encode import encode_bytes
from lafs_core.immutable.layout import parse_header
from lafs_core.mutable.layout import parse_share_header
from lafs_core.storage.containers import IMMUTABLE_DATA_OFFSET, MUTABLE_DATA_OFFSET

from .grid_helpers import local_grid, share_files


def shares_of(root: Path, cap: Cap) -> list[Path]:
    assert cap.storage_index is not None
    name = base32.encode(cap.storage_index)
    return sorted(path for path in share_files(root) if path.parent.name == name)


def run_check(grid: Grid, cap: Cap, **options: bool) -> CheckResult:
    return trio.run(lambda: check(grid, cap, **options))


def upload(grid: Grid, data: bytes) -> Cap:
    return trio.run(lambda: upload_immutable(grid, len(data), bytes_chunks(data)))


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_chk_healthy_then_unhealthy_then_unrecoverable(tmp_path: Path) -> None:
    grid = local_grid(tmp_path)
    cap = upload(grid, os.urandom(300_000))
    assert isinstance(cap, ChkCap)
    result = run_check(grid, cap)
    assert (result.healthy, result.recoverable, result.summary) == (True, True, "Healthy")
    assert (result.needed, result.expected, len(result.good_shares), result.good_share_hosts) == (3, 10, 10, 5)
    assert result.happiness == 5 and len(result.servers_responding) == 5
    files = shares_of(tmp_path, cap)
    for path in files[:7]:
        path.unlink()
    result = run_check(grid, cap, verify=True)
    assert (result.healthy, result.recoverable) == (False, True)
    assert result.summary == "Not Healthy: 3 shares (enc 3-of-10)"
    files[7].unlink()
    result = run_check(grid, cap)
    assert (result.recoverable, result.recoverable_versions, result.unrecoverable_versions) == (False, 0, 1)


def test_a_corrupt_block_is_found_only_by_verify_and_reported_to_its_server(tmp_path: Path) -> None:
    grid = local_grid(tmp_path)
    cap = upload(grid, os.urandom(2 * 1024 * 1024 + 5))
    victim = shares_of(tmp_path, cap)[0]
    flip(victim, IMMUTABLE_DATA_OFFSET + 0x24 + 1000)  # inside the first block
    assert run_check(grid, cap).healthy
    assert not list(tmp_path.glob("server-*/corruption-advisories/*"))
    result = run_check(grid, cap, verify=True)
    assert not result.healthy and result.recoverable and len(result.good_shares) == 9
    [corrupt] = result.corrupt_shares
    assert corrupt.shnum == int(victim.name) and corrupt.shnum not in result.good_shares
    assert victim.is_relative_to(tmp_path / corrupt.server_id)
    assert "block 0" in corrupt.reason
    [advisory] = tmp_path.glob("server-*/corruption-advisories/*")
    assert advisory.is_relative_to(tmp_path / corrupt.server_id)


@pytest.mark.parametrize("file_format", ["sdmf", "mdmf"])
def test_mutable_healthy_and_a_corrupt_share_found_by_verify(tmp_path: Path, file_format: str) -> None:
    grid = local_grid(tmp_path)
    cap = trio.run(lambda: create_mutable(grid, os.urandom(200_000), file_format))
    assert isinstance(cap, MutableWriteCap)
    result = run_check(grid, cap.readonly(), verify=True)
    assert (result.healthy, result.summary, len(result.good_shares)) == (True, "Healthy", 10)
    assert (result.recoverable_versions, result.unrecoverable_versions, result.wrong_shares) == (1, 0, 0)
    assert len(result.sharemap) == 10 and all(key.startswith("seq1-") for key in result.sharemap)
    victim = shares_of(tmp_path, cap)[3]
    header = parse_share_header(victim.read_bytes()[MUTABLE_DATA_OFFSET:])
    flip(victim, MUTABLE_DATA_OFFSET + header.offsets.share_data + 40)
    assert run_check(grid, cap).healthy
    result = run_check(grid, cap, verify=True)
    assert not result.healthy and result.recoverable and len(result.good_shares) == 9
    assert [share.shnum for share in result.corrupt_shares] == [int(victim.name)]
    assert result.summary.startswith("Unhealthy: 9 shares (enc 3-of-10) Corrupt Shares:")
    assert len(list(tmp_path.glob("server-*/corruption-advisories/*"))) == 1


def test_literal_and_directories(tmp_path: Path) -> None:
    grid = local_grid(tmp_path)
    literal = upload(grid, b"small")
    assert isinstance(literal, LiteralCap)
    assert run_check(grid, literal, verify=True).summary == "Healthy (LIT)"
    directory = trio.run(lambda: create_directory(grid, file_format="mdmf"))
    result = run_check(grid, directory, verify=True, add_lease=True)
    assert result.healthy and result.storage_index == directory.storage_index


def test_verify_needs_a_read_cap(tmp_path: Path) -> None:
    grid = local_grid(tmp_path)
    cap = upload(grid, os.urandom(1000))
    verifier = cap.verifier()
    assert verifier is not None
    assert run_check(grid, verifier).healthy
    with pytest.raises(LafsError, match="verify cap"):
        run_check(grid, verifier, verify=True)


def _encoded_share() -> tuple[ChkCap, bytes]:
    cap, shares = encode_bytes(bytes(range(256)) * 12, key=b"k" * 16, max_segment_size=999)
    assert isinstance(cap, ChkCap)
    return cap, shares[4]


def _verdict(cap: ChkCap, share: bytes) -> str | None:
    reader = ChkReader(cap, [4])
    return drive(reader.verify_share(4), {4: bytes_reader(share)})


def test_verify_passes_a_whole_share_alone() -> None:
    cap, share = _encoded_share()
    assert _verdict(cap, share) is None
    assert _verdict(cap, share[:-1]) == "share ends inside its UEB"


@given(st.data())
def test_verify_finds_any_flipped_byte_it_is_meant_to_check(data: st.DataObject) -> None:
    """Every byte of a share is checked but the unused plaintext hash tree region, which no reader trusts."""
    cap, share = _encoded_share()
    offsets = parse_header(share)
    position = data.draw(
        st.integers(0, len(share) - 1).filter(
            lambda p: not offsets.plaintext_hash_tree <= p < offsets.crypttext_hash_tree
        )
    )
    flipped = bytearray(share)
    flipped[position] ^= data.draw(st.integers(1, 255))
    assert _verdict(cap, bytes(flipped)) is not None
