"""A storage server's shares on disk, in Tahoe's layout (`storage/server.py`, `immutable.py`, `mutable.py`).

    ROOT/shares/<si[:2]>/<si>/<shnum>             finished shares, immutable or mutable containers
    ROOT/shares/incoming/<si[:2]>/<si>/<shnum>    immutable uploads in progress (wiped at start-up)
    ROOT/corruption-advisories/<time>--<si>-<shnum>
    ROOT/journal/                                 in-place changes not yet known to be complete

Nothing a kill can interrupt leaves a damaged share: an immutable share appears under `shares/` only by an
atomic rename once all of it is written and fsynced, and every in-place change to an existing share (mutable
writes, leases) goes through the write-ahead journal.

The store is synchronous and not thread-safe; the servers that use it call it from one thread.
"""

from __future__ import annotations

import functools
import hmac
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import base32
from ..errors import FormatError, LafsError
from ..mutable.slot import TestAndWrite, all_tests_hold, apply_writes
from .containers import (
    EMPTY_MUTABLE_LEASE,
    IMMUTABLE_DATA_OFFSET,
    IMMUTABLE_LEASE,
    LEASE_DURATION,
    MAX_MUTABLE_SHARE_SIZE,
    MUTABLE_DATA_OFFSET,
    MUTABLE_HEADER,
    MUTABLE_LEASE,
    MUTABLE_LEASE_SLOTS,
    MUTABLE_MAGIC_V2,
    ImmutableLease,
    MutableContainerHeader,
    MutableLease,
    hash_lease_secret,
    immutable_header,
    is_mutable_container,
    parse_immutable_container,
    parse_mutable_extra_leases,
    parse_mutable_header,
    parse_mutable_leases,
)
from .journal import FileChange, Journal, fsync_directory

IDLE_UPLOAD_TIMEOUT = 30 * 60


class StoreError(LafsError):
    """A request the store refuses; the subclass says why (the HTTP server maps each to a status code)."""


class UnknownUploadError(StoreError):
    pass


class WrongSecretError(StoreError):
    pass


class ConflictingWriteError(StoreError):
    pass


class OutOfBoundsError(StoreError):
    pass


class AlreadyCompleteError(StoreError):
    pass


class NoSuchShareError(StoreError):
    pass


class BadWriteEnablerError(StoreError):
    pass


class TooLargeError(StoreError):
    pass


def _ranges_add(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Union of sorted disjoint [start, end) ranges with one more."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted([*ranges, (start, end)]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _ranges_missing(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    missing, pos = [], 0
    for a, b in ranges:
        if a > pos:
            missing.append((pos, a))
        pos = max(pos, b)
    if pos < size:
        missing.append((pos, size))
    return missing


@dataclass
class _Upload:
    """An immutable share being written: where, by whom, and which bytes have arrived."""

    path: Path
    final_path: Path
    size: int
    secret: bytes
    lease: ImmutableLease
    written: list[tuple[int, int]] = field(default_factory=list)
    touched: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class StoredShare:
    """A finished share as the lease checker sees it."""

    shnum: int
    mutable: bool
    size: int  # bytes of its file: what deleting it gives back
    lease_expirations: tuple[int, ...] | None  # None: the container does not parse (kept, reported as corrupt)


@dataclass(frozen=True)
class Allocation:
    already_have: frozenset[int]
    allocated: frozenset[int]


@dataclass(frozen=True)
class ReadTestWriteOutcome:
    success: bool
    data: dict[int, list[bytes]]


class ShareStore:
    """Shares of many storage indexes under one root directory."""

    def __init__(self, root: Path, *, reserved_space: int = 0, nodeid: bytes = bytes(20)) -> None:
        self.root = Path(root)
        self.shares_dir = self.root / "shares"
        self.incoming_dir = self.shares_dir / "incoming"
        self.advisories_dir = self.root / "corruption-advisories"
        self.reserved_space = reserved_space
        self.nodeid = nodeid
        self._uploads: dict[tuple[bytes, int], _Upload] = {}
        self.shares_dir.mkdir(parents=True, exist_ok=True)
        self._journal = Journal(self.root)
        self._journal.recover()
        if self.incoming_dir.exists():
            shutil.rmtree(self.incoming_dir)

    # --- paths and space ---------------------------------------------------------------------------------
    def _bucket(self, storage_index: bytes, incoming: bool = False) -> Path:
        si = base32.encode(storage_index)
        return (self.incoming_dir if incoming else self.shares_dir) / si[:2] / si

    def _share_path(self, storage_index: bytes, shnum: int) -> Path:
        return self._bucket(storage_index) / str(shnum)

    def _shnums(self, storage_index: bytes) -> dict[int, Path]:
        bucket = self._bucket(storage_index)
        try:
            names = os.listdir(bucket)
        except FileNotFoundError:
            return {}
        return {int(name): bucket / name for name in names if name.isascii() and name.isdigit()}

    def available_space(self) -> int:
        """Free space for new shares: the disk's, less the reserve and what uploads in progress will need."""
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize - self.reserved_space
        pending = sum(u.size - sum(b - a for a, b in u.written) for u in self._uploads.values())
        return max(0, free - pending)

    # --- immutable -----------------------------------------------------------------------------------------
    def _is_immutable(self, path: Path) -> bool:
        with open(path, "rb") as f:
            return not is_mutable_container(f.read(32))

    def immutable_shares(self, storage_index: bytes) -> set[int]:
        return {n for n, p in self._shnums(storage_index).items() if self._is_immutable(p)}

    def allocate(
        self,
        storage_index: bytes,
        renew_secret: bytes,
        cancel_secret: bytes,
        upload_secret: bytes,
        shnums: set[int],
        allocated_size: int,
    ) -> Allocation:
        """Tahoe's allocate_buckets: report finished shares (renewing their lease), open writers for others."""
        self._expire_idle_uploads()
        present = self._shnums(storage_index)
        existing = {n for n, p in present.items() if self._is_immutable(p)}
        for shnum in existing:
            self._add_immutable_lease(self._share_path(storage_index, shnum), renew_secret, cancel_secret, owner=0)
        allocated = set()
        remaining = self.available_space()
        lease = ImmutableLease(
            0, hash_lease_secret(renew_secret), hash_lease_secret(cancel_secret), int(time.time()) + LEASE_DURATION
        )
        for shnum in sorted(shnums):
            key = (storage_index, shnum)
            # A mutable share under the same number is neither reported nor replaced.
            if shnum in present or key in self._uploads or not 0 <= shnum < 256:
                continue
            if allocated_size > remaining:
                continue
            remaining -= allocated_size
            path = self._bucket(storage_index, incoming=True) / str(shnum)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(immutable_header(allocated_size, 0))
            self._uploads[key] = _Upload(
                path, self._share_path(storage_index, shnum), allocated_size, upload_secret, lease
            )
            allocated.add(shnum)
        return Allocation(frozenset(existing), frozenset(allocated))

    def _upload(self, storage_index: bytes, shnum: int, upload_secret: bytes) -> _Upload:
        upload = self._uploads.get((storage_index, shnum))
        if upload is None:
            raise UnknownUploadError("no upload in progress for this share")
        if not hmac.compare_digest(upload.secret, upload_secret):
            raise WrongSecretError("wrong upload secret")
        return upload

    def check_write(self, storage_index: bytes, shnum: int, upload_secret: bytes, start: int, end: int) -> None:
        """Refuse, before any data arrives, a write to an unknown upload, with a wrong secret or out of bounds."""
        upload = self._upload(storage_index, shnum, upload_secret)
        if start < 0 or end > upload.size:
            raise OutOfBoundsError(f"write [{start}, {end}) beyond the allocated {upload.size} bytes")

    def write(
        self, storage_index: bytes, shnum: int, upload_secret: bytes, offset: int, data: bytes
    ) -> list[tuple[int, int]]:
        """Write part of an immutable share; returns the ranges still missing (empty once it is complete)."""
        end = offset + len(data)
        self.check_write(storage_index, shnum, upload_secret, offset, end)
        upload = self._uploads[(storage_index, shnum)]
        upload.touched = time.monotonic()
        with open(upload.path, "r+b") as f:
            for a, b in upload.written:
                lo, hi = max(a, offset), min(b, end)
                if lo < hi:
                    f.seek(IMMUTABLE_DATA_OFFSET + lo)
                    if f.read(hi - lo) != data[lo - offset : hi - offset]:
                        raise ConflictingWriteError(f"bytes [{lo}, {hi}) were already written differently")
            f.seek(IMMUTABLE_DATA_OFFSET + offset)
            f.write(data)
        upload.written = _ranges_add(upload.written, offset, end)
        missing = _ranges_missing(upload.written, upload.size)
        if not missing:
            self._finish_upload(storage_index, shnum, upload)
        return missing

    def _finish_upload(self, storage_index: bytes, shnum: int, upload: _Upload) -> None:
        with open(upload.path, "r+b") as f:
            f.seek(0)
            f.write(immutable_header(upload.size, 1))
            f.seek(IMMUTABLE_DATA_OFFSET + upload.size)
            f.write(upload.lease.pack())
            f.flush()
            os.fsync(f.fileno())
        upload.final_path.parent.mkdir(parents=True, exist_ok=True)
        os.rename(upload.path, upload.final_path)
        fsync_directory(upload.final_path.parent)
        del self._uploads[(storage_index, shnum)]
        self._remove_empty_incoming(upload.path.parent)

    def _remove_empty_incoming(self, directory: Path) -> None:
        while directory != self.incoming_dir and directory.is_relative_to(self.incoming_dir):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def abort(self, storage_index: bytes, shnum: int, upload_secret: bytes) -> None:
        if (storage_index, shnum) not in self._uploads and shnum in self.immutable_shares(storage_index):
            raise AlreadyCompleteError("the share is already complete")
        upload = self._upload(storage_index, shnum, upload_secret)
        del self._uploads[(storage_index, shnum)]
        upload.path.unlink(missing_ok=True)
        self._remove_empty_incoming(upload.path.parent)

    def _expire_idle_uploads(self) -> None:
        now = time.monotonic()
        for (si, shnum), upload in list(self._uploads.items()):
            if now - upload.touched > IDLE_UPLOAD_TIMEOUT:
                del self._uploads[(si, shnum)]
                upload.path.unlink(missing_ok=True)
                self._remove_empty_incoming(upload.path.parent)

    def read_immutable(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        path = self._shnums(storage_index).get(shnum)
        if path is None or not self._is_immutable(path):
            raise NoSuchShareError("no such immutable share")
        size = path.stat().st_size
        with open(path, "rb") as f:
            info = parse_immutable_container(f.read(IMMUTABLE_DATA_OFFSET), size)
            end = min(offset + length, info.data_length)
            if offset >= end:
                return b""
            f.seek(IMMUTABLE_DATA_OFFSET + offset)
            return f.read(end - offset)

    def immutable_data_length(self, storage_index: bytes, shnum: int) -> int:
        path = self._shnums(storage_index).get(shnum)
        if path is None or not self._is_immutable(path):
            raise NoSuchShareError("no such immutable share")
        with open(path, "rb") as f:
            return parse_immutable_container(f.read(IMMUTABLE_DATA_OFFSET), path.stat().st_size).data_length

    def _add_immutable_lease(self, path: Path, renew_secret: bytes, cancel_secret: bytes, owner: int) -> None:
        expiration = int(time.time()) + LEASE_DURATION
        renew_hash = hash_lease_secret(renew_secret)
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(IMMUTABLE_DATA_OFFSET)
            info = parse_immutable_container(header, size)
            leases_at = IMMUTABLE_DATA_OFFSET + info.data_length
            f.seek(leases_at)
            records = f.read()
        version = struct.unpack(">L", header[:4])[0]
        change = FileChange(path)
        for i, fields in enumerate(IMMUTABLE_LEASE.iter_unpack(records)):
            lease = ImmutableLease(*fields)
            stored = lease.renew_secret_hash if version == 2 else hash_lease_secret(lease.renew_secret_hash)
            if hmac.compare_digest(stored, renew_hash):
                renewed = ImmutableLease(lease.owner, lease.renew_secret_hash, lease.cancel_secret_hash, expiration)
                change.writes.append((leases_at + i * IMMUTABLE_LEASE.size, renewed.pack()))
                break
        else:
            secrets = (renew_hash, hash_lease_secret(cancel_secret)) if version == 2 else (renew_secret, cancel_secret)
            new = ImmutableLease(owner, *secrets, expiration)
            (count,) = struct.unpack(">L", header[8:12])
            change.writes.append((size, new.pack()))
            change.writes.append((0, header[:8] + struct.pack(">L", count + 1)))
        self._journal.commit([change])

    # --- mutable -------------------------------------------------------------------------------------------
    def mutable_shares(self, storage_index: bytes) -> set[int]:
        return {n for n, p in self._shnums(storage_index).items() if not self._is_immutable(p)}

    def _mutable_header(self, path: Path) -> MutableContainerHeader:
        with open(path, "rb") as f:
            return parse_mutable_header(f.read(MUTABLE_HEADER.size))

    def read_mutable(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        path = self._shnums(storage_index).get(shnum)
        if path is None or self._is_immutable(path):
            raise NoSuchShareError("no such mutable share")
        return self._read_mutable_path(path, offset, length)

    def _read_mutable_path(self, path: Path, offset: int, length: int) -> bytes:
        header = self._mutable_header(path)
        end = min(offset + length, header.data_length)
        if offset >= end:
            return b""
        with open(path, "rb") as f:
            f.seek(MUTABLE_DATA_OFFSET + offset)
            return f.read(end - offset)

    def mutable_data_length(self, storage_index: bytes, shnum: int) -> int:
        path = self._shnums(storage_index).get(shnum)
        if path is None or self._is_immutable(path):
            raise NoSuchShareError("no such mutable share")
        return self._mutable_header(path).data_length

    def read_test_write(
        self,
        storage_index: bytes,
        write_enabler: bytes,
        renew_secret: bytes,
        cancel_secret: bytes,
        vectors: dict[int, TestAndWrite],
        read_vector: list[tuple[int, int]],
    ) -> ReadTestWriteOutcome:
        """Tahoe's slot_testv_and_readv_and_writev, applied atomically through the journal."""
        present = self._shnums(storage_index)
        existing = {n: p for n, p in present.items() if not self._is_immutable(p)}
        if len(existing) < len(present):
            # Tahoe reads an immutable share's bytes as a mutable header, so no write enabler ever matches.
            raise BadWriteEnablerError("the storage index holds immutable shares")
        for path in existing.values():
            if not hmac.compare_digest(self._mutable_header(path).write_enabler, write_enabler):
                raise BadWriteEnablerError("the write enabler does not match")
        holds = all(
            all_tests_hold(
                functools.partial(self._read_mutable_path, existing[shnum]) if shnum in existing else None,
                vector.tests,
            )
            for shnum, vector in vectors.items()
        )
        data = {
            shnum: [self._read_mutable_path(path, o, s) for o, s in read_vector] for shnum, path in existing.items()
        }
        if not holds:
            return ReadTestWriteOutcome(False, data)
        changes = []
        survivors = []
        for shnum, vector in sorted(vectors.items()):
            path = existing.get(shnum) or self._share_path(storage_index, shnum)
            if vector.new_length == 0:
                if shnum in existing:
                    changes.append(FileChange(path, delete=True))
                continue
            if shnum not in existing and not vector.writes:
                continue
            change = self._mutable_change(path, shnum in existing, write_enabler, vector)
            changes.append(change)
            survivors.append((path, shnum in existing))
        self._journal.commit(changes)
        for path, _ in survivors:
            self._add_mutable_lease(path, renew_secret, cancel_secret)
        return ReadTestWriteOutcome(True, data)

    def _mutable_change(self, path: Path, exists: bool, write_enabler: bytes, vector: TestAndWrite) -> FileChange:
        """The container writes that apply one share's write vectors, as absolute file pieces."""
        if exists:
            with open(path, "rb") as f:
                raw = f.read()
            header = parse_mutable_header(raw)
            old_data = raw[MUTABLE_DATA_OFFSET : MUTABLE_DATA_OFFSET + header.data_length]
            count_at = header.extra_lease_offset
            (extra_count,) = struct.unpack(">L", raw[count_at : count_at + 4] or b"\0\0\0\0")
            extra_leases = raw[count_at + 4 : count_at + 4 + extra_count * MUTABLE_LEASE.size]
            lease_slots = raw[MUTABLE_HEADER.size : MUTABLE_DATA_OFFSET]
        else:
            header = MutableContainerHeader(MUTABLE_MAGIC_V2, self.nodeid, write_enabler, 0, MUTABLE_DATA_OFFSET)
            old_data, extra_count, extra_leases = b"", 0, b""
            lease_slots = EMPTY_MUTABLE_LEASE.pack() * MUTABLE_LEASE_SLOTS
        new_data = apply_writes(old_data, vector.writes, vector.new_length)
        if len(new_data) > MAX_MUTABLE_SHARE_SIZE:
            raise TooLargeError("mutable share would exceed the maximum size")
        data_length = len(new_data)
        # Containers never shrink: the extra-lease block moves only further out.
        extra_at = max(header.extra_lease_offset, MUTABLE_DATA_OFFSET + len(new_data))
        new_header = MutableContainerHeader(
            header.magic, header.write_enabler_nodeid, header.write_enabler, data_length, extra_at
        )
        change = FileChange(path)
        change.writes.append((0, new_header.pack()))
        if not exists:
            change.writes.append((MUTABLE_HEADER.size, lease_slots))
        changed = [(w.offset, w.data) for w in vector.writes if w.data]
        # Gaps the writes leave beyond the old end read as zeros: write them explicitly.
        if len(new_data) > len(old_data):
            changed.append((len(old_data), new_data[len(old_data) :]))
        for offset, piece in changed:
            change.writes.append((MUTABLE_DATA_OFFSET + offset, new_data[offset : offset + len(piece)]))
        change.writes.append((extra_at, struct.pack(">L", extra_count) + extra_leases))
        return change

    def _add_mutable_lease(self, path: Path, renew_secret: bytes, cancel_secret: bytes) -> None:
        with open(path, "rb") as f:
            raw = f.read()
        header = parse_mutable_header(raw)
        expiration = int(time.time()) + LEASE_DURATION
        slots = [
            MutableLease(*fields)
            for fields in MUTABLE_LEASE.iter_unpack(raw[MUTABLE_HEADER.size : MUTABLE_DATA_OFFSET])
        ]
        count_at = header.extra_lease_offset
        (extra_count,) = struct.unpack(">L", raw[count_at : count_at + 4] or b"\0\0\0\0")
        extras = [
            MutableLease(*fields)
            for fields in MUTABLE_LEASE.iter_unpack(raw[count_at + 4 : count_at + 4 + extra_count * MUTABLE_LEASE.size])
        ]
        change = FileChange(path)
        positions = [MUTABLE_HEADER.size + i * MUTABLE_LEASE.size for i in range(MUTABLE_LEASE_SLOTS)]
        positions += [count_at + 4 + i * MUTABLE_LEASE.size for i in range(extra_count)]
        for lease, position in zip(slots + extras, positions, strict=True):
            if lease.owner and hmac.compare_digest(lease.renew_secret, renew_secret):
                renewed = MutableLease(lease.owner, expiration, lease.renew_secret, lease.cancel_secret, lease.nodeid)
                change.writes.append((position, renewed.pack()))
                break
        else:
            new = MutableLease(1, expiration, renew_secret, cancel_secret, self.nodeid).pack()
            free = next((i for i, lease in enumerate(slots) if not lease.owner), None)
            if free is not None:
                change.writes.append((positions[free], new))
            else:
                change.writes.append((count_at, struct.pack(">L", extra_count + 1)))
                change.writes.append((count_at + 4 + extra_count * MUTABLE_LEASE.size, new))
        self._journal.commit([change])

    # --- both ----------------------------------------------------------------------------------------------
    def add_or_renew_lease(self, storage_index: bytes, renew_secret: bytes, cancel_secret: bytes) -> bool:
        """Renew the lease whose renew secret matches on every share of the index, or add one; False if none."""
        shares = self._shnums(storage_index)
        for path in shares.values():
            if self._is_immutable(path):
                self._add_immutable_lease(path, renew_secret, cancel_secret, owner=1)
            else:
                self._add_mutable_lease(path, renew_secret, cancel_secret)
        return bool(shares)

    def stored_shares(self, storage_index: bytes) -> list[StoredShare]:
        """The finished shares of one storage index with their leases, in share-number order."""
        return [self._stored_share(shnum, path) for shnum, path in sorted(self._shnums(storage_index).items())]

    @staticmethod
    def _stored_share(shnum: int, path: Path) -> StoredShare:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(MUTABLE_DATA_OFFSET)
            mutable = is_mutable_container(head)
            try:
                if mutable:
                    header = parse_mutable_header(head)
                    f.seek(header.extra_lease_offset)
                    extra = parse_mutable_extra_leases(f.read())
                    slots = parse_mutable_leases(head[MUTABLE_HEADER.size : MUTABLE_DATA_OFFSET])
                    expirations = tuple(lease.expiration for lease in slots + extra)
                else:
                    info = parse_immutable_container(head, size)
                    f.seek(IMMUTABLE_DATA_OFFSET + info.data_length)
                    leases = parse_immutable_container(head, size, f.read()).leases
                    expirations = tuple(lease.expiration for lease in leases)
            except FormatError:
                return StoredShare(shnum, mutable, size, None)
        return StoredShare(shnum, mutable, size, expirations)

    def delete_share(self, storage_index: bytes, shnum: int) -> None:
        """Delete a finished share, then its bucket directory if that is left empty (expired leases).

        Unlinking is atomic: a kill leaves the share whole or gone, never a part of it, and at worst an empty
        bucket directory, which `remove_bucket_if_empty` takes away later."""
        path = self._share_path(storage_index, shnum)
        path.unlink()
        fsync_directory(path.parent)
        self.remove_bucket_if_empty(storage_index)

    def remove_bucket_if_empty(self, storage_index: bytes) -> bool:
        """Remove the bucket directory of a storage index that has no files left; False if it has some."""
        bucket = self._bucket(storage_index)
        try:
            bucket.rmdir()
        except OSError:
            return False
        fsync_directory(bucket.parent)
        return True

    def advise_corrupt(self, storage_index: bytes, shnum: int, reason: str, *, mutable: bool) -> None:
        """Record a client's report that a share failed verification (Tahoe keeps these for operators)."""
        shares = self.mutable_shares(storage_index) if mutable else self.immutable_shares(storage_index)
        if shnum not in shares:
            raise NoSuchShareError("no such share")
        self.advisories_dir.mkdir(parents=True, exist_ok=True)
        now = time.strftime("%Y-%m-%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
        si = base32.encode(storage_index)
        name = f"{now}--{si}-{shnum}"
        kind = "mutable" if mutable else "immutable"
        report = f"report: Share Corruption\ntype: {kind}\nstorage_index: {si}\nshare_number: {shnum}\n\n{reason}\n\n"
        (self.advisories_dir / name).write_text(report, encoding="utf-8")
