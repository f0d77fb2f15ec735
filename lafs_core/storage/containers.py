"""Tahoe's share containers as stored by a storage server (`storage/immutable.py`, `storage/mutable.py`).

Pure layout code: headers and lease records packed and parsed, and the read-test-write rules of mutable slots
expressed over a share's bytes. The share store applies them to files.

Immutable container: `>LLL` (version, allocated size capped at 2^32-1, lease count), share data from 0x0c,
then 72-byte leases `>L32s32sL`. Version 2 stores blake2b hashes of the lease secrets; version 1 stored them.

Mutable container: 32-byte magic, write-enabler nodeid (20) and write enabler (32), data length and extra-lease
offset (`>QQ`), four 92-byte lease slots `>LL32s32s20s`, then the data from 468; extra leases sit at the
extra-lease offset as a `>L` count and records.
"""

import hashlib
import struct
from dataclasses import dataclass

from ..errors import FormatError
from ..hashes import tagged_hash

LEASE_DURATION = 31 * 24 * 3600
"""How long a lease runs from its grant or last renewal. Tahoe stores only the expiration time and derives the
grant time from it by this fixed duration (`LeaseInfo.get_grant_renew_time_time`)."""

# --- immutable -------------------------------------------------------------------------------------------------
IMMUTABLE_HEADER = struct.Struct(">LLL")
IMMUTABLE_LEASE = struct.Struct(">L32s32sL")
IMMUTABLE_DATA_OFFSET = IMMUTABLE_HEADER.size


@dataclass(frozen=True)
class ImmutableLease:
    owner: int
    renew_secret_hash: bytes
    cancel_secret_hash: bytes
    expiration: int

    def pack(self) -> bytes:
        return IMMUTABLE_LEASE.pack(self.owner, self.renew_secret_hash, self.cancel_secret_hash, self.expiration)


def hash_lease_secret(secret: bytes) -> bytes:
    """How a v2 immutable container stores a lease secret: blake2b, 32 bytes."""
    return hashlib.blake2b(secret, digest_size=32).digest()


def immutable_header(data_length: int, num_leases: int, version: int = 2) -> bytes:
    return IMMUTABLE_HEADER.pack(version, min(data_length, 2**32 - 1), num_leases)


@dataclass(frozen=True)
class ImmutableContainer:
    version: int
    data_length: int
    leases: tuple[ImmutableLease, ...]


def parse_immutable_container(header: bytes, file_size: int, lease_bytes: bytes = b"") -> ImmutableContainer:
    """Parse the 12-byte header of a file of `file_size` bytes; `lease_bytes` are its trailing lease records."""
    if len(header) < IMMUTABLE_HEADER.size:
        raise FormatError("immutable container shorter than its header")
    version, _size, num_leases = IMMUTABLE_HEADER.unpack(header[: IMMUTABLE_HEADER.size])
    if version not in (1, 2):
        raise FormatError(f"unknown immutable container version {version}")
    data_length = file_size - IMMUTABLE_DATA_OFFSET - num_leases * IMMUTABLE_LEASE.size
    if data_length < 0:
        raise FormatError("immutable container lease count exceeds its size")
    leases = tuple(ImmutableLease(*fields) for fields in IMMUTABLE_LEASE.iter_unpack(lease_bytes))
    return ImmutableContainer(version, data_length, leases)


def immutable_share_data(raw: bytes) -> bytes:
    """The share data of a whole immutable container file."""
    info = parse_immutable_container(raw, len(raw))
    return raw[IMMUTABLE_DATA_OFFSET : IMMUTABLE_DATA_OFFSET + info.data_length]


# --- mutable ---------------------------------------------------------------------------------------------------
_MAGIC_TEXT = b"Tahoe mutable container v%d\n"
MUTABLE_MAGIC_V1 = b"Tahoe mutable container v1\n\x75\x09\x44\x03\x8e"
MUTABLE_MAGIC_V2 = _MAGIC_TEXT % 2 + tagged_hash(b"allmydata_mutable_container_header", _MAGIC_TEXT % 2, 5)
MUTABLE_HEADER = struct.Struct(">32s20s32sQQ")
MUTABLE_LEASE = struct.Struct(">LL32s32s20s")
MUTABLE_LEASE_SLOTS = 4
MUTABLE_DATA_OFFSET = MUTABLE_HEADER.size + MUTABLE_LEASE_SLOTS * MUTABLE_LEASE.size  # 468
MAX_MUTABLE_SHARE_SIZE = 69105 * 10**12


@dataclass(frozen=True)
class MutableLease:
    owner: int
    expiration: int
    renew_secret: bytes
    cancel_secret: bytes
    nodeid: bytes

    def pack(self) -> bytes:
        return MUTABLE_LEASE.pack(self.owner, self.expiration, self.renew_secret, self.cancel_secret, self.nodeid)


EMPTY_MUTABLE_LEASE = MutableLease(0, 0, bytes(32), bytes(32), bytes(20))


@dataclass(frozen=True)
class MutableContainerHeader:
    magic: bytes
    write_enabler_nodeid: bytes
    write_enabler: bytes
    data_length: int
    extra_lease_offset: int

    def pack(self) -> bytes:
        return MUTABLE_HEADER.pack(
            self.magic, self.write_enabler_nodeid, self.write_enabler, self.data_length, self.extra_lease_offset
        )


def is_mutable_container(prefix: bytes) -> bool:
    return prefix[:32] in (MUTABLE_MAGIC_V1, MUTABLE_MAGIC_V2)


def parse_mutable_header(data: bytes) -> MutableContainerHeader:
    if len(data) < MUTABLE_HEADER.size:
        raise FormatError("mutable container shorter than its header")
    header = MutableContainerHeader(*MUTABLE_HEADER.unpack(data[: MUTABLE_HEADER.size]))
    if not is_mutable_container(header.magic):
        raise FormatError("not a mutable container (bad magic)")
    if header.extra_lease_offset < MUTABLE_DATA_OFFSET + header.data_length:
        raise FormatError("mutable container extra-lease offset lies inside its data")
    return header


def parse_mutable_leases(slots: bytes) -> list[MutableLease]:
    """The leases in packed mutable lease records, the four header slots or the extra ones (empty records,
    owner 0, are left out, as Tahoe leaves them out)."""
    leases = [MutableLease(*fields) for fields in MUTABLE_LEASE.iter_unpack(slots)]
    return [lease for lease in leases if lease.owner]


def parse_mutable_extra_leases(block: bytes) -> list[MutableLease]:
    """The leases beyond the four slots: `block` starts at the extra-lease offset (a `>L` count, then records)."""
    if len(block) < 4:
        raise FormatError("mutable container ends before its extra-lease count")
    (count,) = struct.unpack(">L", block[:4])
    records = block[4 : 4 + count * MUTABLE_LEASE.size]
    if len(records) < count * MUTABLE_LEASE.size:
        raise FormatError("mutable container ends inside its extra leases")
    return parse_mutable_leases(records)


def new_mutable_container(write_enabler_nodeid: bytes, write_enabler: bytes) -> bytes:
    """An empty v2 mutable container: header, four empty lease slots, no data, extra-lease count 0."""
    header = MutableContainerHeader(
        MUTABLE_MAGIC_V2, write_enabler_nodeid, write_enabler, 0, MUTABLE_DATA_OFFSET
    ).pack()
    return header + EMPTY_MUTABLE_LEASE.pack() * MUTABLE_LEASE_SLOTS + struct.pack(">L", 0)


def mutable_share_data(raw: bytes) -> bytes:
    """The share data of a whole mutable container file."""
    header = parse_mutable_header(raw)
    return raw[MUTABLE_DATA_OFFSET : MUTABLE_DATA_OFFSET + header.data_length]


def share_data(raw: bytes) -> bytes:
    """The share data of a container file of either kind."""
    return mutable_share_data(raw) if is_mutable_container(raw) else immutable_share_data(raw)
