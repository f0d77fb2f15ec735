"""Access to `../shared`: Tahoe's vectors and the share trees written by a real Tahoe-LAFS 1.20.0 grid."""

import base64
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from lafs_core import base32
from lafs_core.mutable.retrieve import ShareRef
from lafs_core.storage.containers import share_data

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BLACKMATCH_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors"
SAMPLE_GRID = SHARED / "fixtures" / "tahoe-1.20-sample-grid"

if not SHARED.is_dir():
    raise RuntimeError(f"the shared vectors and fixtures are missing: {SHARED} (set BLACKMATCH_SHARED)")


@cache
def load_yaml(name: str):
    with (VECTORS / name).open() as f:
        return yaml.safe_load(f)


@dataclass(frozen=True)
class CapVector:
    """One case of Tahoe's `test_vectors.yaml`."""

    convergence: bytes
    kind: str  # "chk" or "ssk"
    mutable_format: str | None  # "sdmf" / "mdmf" for ssk
    key_pem: str | None
    plaintext_seed: bytes
    length: int
    needed: int
    total: int
    segment_size: int
    expected: str

    @property
    def plaintext(self) -> bytes:
        seed = self.plaintext_seed
        return (seed * (self.length // len(seed) + 1))[: self.length]


@cache
def cap_vectors() -> list[CapVector]:
    cases = []
    for case in load_yaml("tahoe-test-vectors.yaml")["vector"]:
        params = case["format"]["params"] or {}
        cases.append(
            CapVector(
                convergence=base64.b64decode(case["convergence"]),
                kind=case["format"]["kind"],
                mutable_format=params.get("format"),
                key_pem=params.get("key"),
                plaintext_seed=base64.b64decode(case["sample"]["seed"]),
                length=case["sample"]["length"],
                needed=case["zfec"]["required"],
                total=case["zfec"]["total"],
                segment_size=case["zfec"]["segmentSize"],
                expected=case["expected"],
            )
        )
    return cases


@cache
def sample_caps() -> dict[str, str]:
    caps = {}
    for line in (SAMPLE_GRID / "caps.txt").read_text().splitlines():
        if line.strip():
            name, cap = line.split()
            caps[name] = cap
    return caps


def sample_plaintext(name: str) -> bytes:
    return (SAMPLE_GRID / "plaintext" / name).read_bytes()


def sample_convergence() -> str:
    return (SAMPLE_GRID / "convergence").read_text().strip()


def sample_share_files(storage_index_b32: str) -> dict[int, Path]:
    """Share number -> path of the share file in the sample grid's five servers."""
    found = {}
    for server in sorted((SAMPLE_GRID / "servers").iterdir()):
        bucket = server / "shares" / storage_index_b32[:2] / storage_index_b32
        if bucket.is_dir():
            for share in bucket.iterdir():
                found[int(share.name)] = share
    return found


def sample_shares(storage_index: bytes) -> dict[ShareRef, bytes]:
    """(server, share number) -> share data, read out of the sample grid's container files."""
    si = base32.encode(storage_index)
    found = {}
    for server in sorted((SAMPLE_GRID / "servers").iterdir()):
        bucket = server / "shares" / si[:2] / si
        if bucket.is_dir():
            for share in bucket.iterdir():
                found[ShareRef(server.name, int(share.name))] = share_data(share.read_bytes())
    return found
