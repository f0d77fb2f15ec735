"""A storage server that is a directory on this machine: the share store called in-process.

Used for node directories whose servers are local share trees (the embedded grid `create-node` makes, or
copies of another server's `shares/`). Store calls run in a worker thread, one at a time per store, so the
event loop never waits on the disk and the store (not thread-safe) never sees two callers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from ..mutable.slot import TestAndWrite
from ..storage import share_store as store_errors
from ..storage.containers import MAX_MUTABLE_SHARE_SIZE
from ..storage.share_store import ShareStore
from .server_api import (
    AllocationResult,
    LeaseSecrets,
    ReadTestWriteResult,
    RequestRefusedError,
    ServerVersion,
    ShareNotFoundError,
    StorageServer,
    WriteConflictError,
)

T = TypeVar("T")
APPLICATION_VERSION = b"blackmatch local share store"


def local_identity(name: str) -> bytes:
    """A stable 20-byte id for a local server, standing in for a TubID in lease and write-enabler secrets."""
    return hashlib.sha1(b"blackmatch local storage server:" + name.encode()).digest()


class LocalStorageServer(StorageServer):
    def __init__(
        self,
        root: Path,
        *,
        server_id: str,
        nickname: str | None = None,
        tubid: bytes | None = None,
        permutation_seed: bytes | None = None,
    ) -> None:
        self.server_id = server_id
        self.nickname = nickname or server_id
        self.tubid = tubid or local_identity(server_id)
        self.permutation_seed = permutation_seed or self.tubid
        self.root = Path(root)
        self._store: ShareStore | None = None
        self._lock = trio.Lock()

    def _open(self) -> ShareStore:
        if self._store is None:
            self._store = ShareStore(self.root, nodeid=self.tubid)
        return self._store

    async def _call(self, fn: Callable[[ShareStore], T]) -> T:
        async with self._lock:
            try:
                return await trio.to_thread.run_sync(lambda: fn(self._open()))
            except store_errors.NoSuchShareError as exc:
                raise ShareNotFoundError(str(exc), 404) from None
            except store_errors.UnknownUploadError as exc:
                raise ShareNotFoundError(str(exc), 404) from None
            except store_errors.ConflictingWriteError as exc:
                raise WriteConflictError(str(exc), 409) from None
            except (store_errors.WrongSecretError, store_errors.BadWriteEnablerError) as exc:
                raise RequestRefusedError(str(exc), 401) from None
            except store_errors.StoreError as exc:
                raise RequestRefusedError(str(exc), 400) from None

    async def get_version(self) -> ServerVersion:
        space = await self._call(lambda s: s.available_space())
        return ServerVersion(space, MAX_MUTABLE_SHARE_SIZE, space, APPLICATION_VERSION)

    async def allocate_buckets(
        self,
        storage_index: bytes,
        lease: LeaseSecrets,
        upload_secret: bytes,
        share_numbers: set[int],
        allocated_size: int,
    ) -> AllocationResult:
        result = await self._call(
            lambda s: s.allocate(storage_index, lease.renew, lease.cancel, upload_secret, share_numbers, allocated_size)
        )
        return AllocationResult(result.already_have, result.allocated)

    async def write_share_chunk(
        self, storage_index: bytes, shnum: int, upload_secret: bytes, offset: int, data: bytes | memoryview
    ) -> bool:
        missing = await self._call(lambda s: s.write(storage_index, shnum, upload_secret, offset, bytes(data)))
        return not missing

    async def abort_upload(self, storage_index: bytes, shnum: int, upload_secret: bytes) -> None:
        await self._call(lambda s: s.abort(storage_index, shnum, upload_secret))

    async def list_immutable_shares(self, storage_index: bytes) -> set[int]:
        return await self._call(lambda s: s.immutable_shares(storage_index))

    async def read_immutable_share(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        return await self._call(lambda s: s.read_immutable(storage_index, shnum, offset, length))

    async def advise_corrupt_immutable(self, storage_index: bytes, shnum: int, reason: str) -> None:
        await self._call(lambda s: s.advise_corrupt(storage_index, shnum, reason, mutable=False))

    async def add_or_renew_lease(self, storage_index: bytes, lease: LeaseSecrets) -> None:
        found = await self._call(lambda s: s.add_or_renew_lease(storage_index, lease.renew, lease.cancel))
        if not found:
            raise ShareNotFoundError("no shares to lease", 404)

    async def read_test_write(
        self,
        storage_index: bytes,
        write_enabler: bytes,
        lease: LeaseSecrets,
        vectors: dict[int, TestAndWrite],
        read_vector: Sequence[tuple[int, int]],
    ) -> ReadTestWriteResult:
        outcome = await self._call(
            lambda s: s.read_test_write(
                storage_index, write_enabler, lease.renew, lease.cancel, vectors, list(read_vector)
            )
        )
        return ReadTestWriteResult(outcome.success, outcome.data)

    async def list_mutable_shares(self, storage_index: bytes) -> set[int]:
        return await self._call(lambda s: s.mutable_shares(storage_index))

    async def read_mutable_share(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        return await self._call(lambda s: s.read_mutable(storage_index, shnum, offset, length))

    async def advise_corrupt_mutable(self, storage_index: bytes, shnum: int, reason: str) -> None:
        await self._call(lambda s: s.advise_corrupt(storage_index, shnum, reason, mutable=True))
