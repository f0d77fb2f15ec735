"""CHK files against Tahoe itself: the 120 cap vectors and the shares of a real Tahoe-LAFS 1.20.0 grid."""

import subprocess
import sys

import pytest

from lafs_core import base32
from lafs_core.caps import ChkCap, parse_known_cap
from lafs_core.immutable.decode import read_shares
from lafs_core.immutable.encode import encode_bytes
from lafs_core.storage.containers import share_data

from .shared_data import (
    SAMPLE_GRID,
    cap_vectors,
    sample_caps,
    sample_convergence,
    sample_plaintext,
    sample_share_files,
)

CHK_VECTORS = [v for v in cap_vectors() if v.kind == "chk"]
SAMPLE_FILES = sorted(name for name in sample_caps() if name.startswith(("chk-", "lit-")))
SAMPLE_CHK = [name for name in SAMPLE_FILES if name.startswith("chk-")]


def test_there_are_120_chk_vectors():
    assert len(CHK_VECTORS) == 120
    assert max(v.needed for v in CHK_VECTORS) == 101 and max(v.total for v in CHK_VECTORS) == 256


@pytest.mark.parametrize("vector", CHK_VECTORS, ids=lambda v: f"{v.needed}of{v.total}-{v.length}")
def test_chk_vector(vector):
    cap, _shares = encode_bytes(
        vector.plaintext,
        convergence=vector.convergence,
        needed=vector.needed,
        total=vector.total,
        max_segment_size=vector.segment_size,
    )
    assert str(cap) == vector.expected


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_debug_cap_command_matches_tahoe(name, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuse_client.cli",
            "debug",
            "cap",
            str(SAMPLE_GRID / "plaintext" / name),
            "--convergence",
            sample_convergence(),
            "--needed",
            "3",
            "--total",
            "10",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == sample_caps()[name]


@pytest.mark.parametrize("name", SAMPLE_CHK)
def test_share_data_is_byte_identical_to_tahoe(name):
    cap, shares = encode_bytes(sample_plaintext(name), convergence=base32.decode(sample_convergence()))
    assert str(cap) == sample_caps()[name]
    files = sample_share_files(base32.encode(cap.storage_index))
    assert sorted(files) == list(range(10))
    for shnum, path in files.items():
        assert share_data(path.read_bytes()) == shares[shnum], f"share {shnum} differs"


@pytest.mark.parametrize("name", SAMPLE_CHK)
def test_tahoe_shares_decode(name):
    cap = parse_known_cap(sample_caps()[name])
    assert isinstance(cap, ChkCap)
    files = sample_share_files(base32.encode(cap.storage_index))
    shares = {shnum: share_data(path.read_bytes()) for shnum, path in files.items()}
    plaintext = sample_plaintext(name)
    assert read_shares(cap, shares) == plaintext
    # Any three shares will do, including only check shares.
    assert read_shares(cap, {s: shares[s] for s in (7, 8, 9)}) == plaintext
    assert read_shares(cap, shares, 1000, cap.size - 3) == plaintext[1000 : cap.size - 3]
