"""What the grid code needs from a storage server, whatever carries the requests.

Two implementations exist: `gbs_client.GbsStorageServer` (Tahoe's HTTP storage protocol over TLS) and
`local_client.LocalStorageServer` (a share store in a local directory, called in-process). Upload, download,
publish and retrieve are written against this interface only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LafsError
from ..mutable.slot import TestAndWrite


class StorageServerError(LafsError):
    """A request to a storage server failed."""


class ServerUnavailableError(StorageServerError):
    """The server could not be reached, timed out, or broke the connection: try elsewhere, maybe later."""


class ServerIdentityError(ServerUnavailableError):
    """The server's TLS key does not match the one its NURL pins: it is refused before anything is sent."""


class RequestRefusedError(StorageServerError):
    """The server understood the request and refused it (status code in `status`)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ShareNotFoundError(RequestRefusedError):
    """No such share (or upload) on this server."""


class WriteConflictError(RequestRefusedError):
    """An immutable write overlapped bytes already written with different data."""


@dataclass(frozen=True)
class ServerVersion:
    maximum_immutable_share_size: int
    maximum_mutable_share_size: int
    available_space: int
    application_version: bytes


@dataclass(frozen=True)
class AllocationResult:
    already_have: frozenset[int]
    allocated: frozenset[int]


@dataclass(frozen=True)
class ReadTestWriteResult:
    success: bool
    data: dict[int, list[bytes]]


@dataclass(frozen=True)
class LeaseSecrets:
    renew: bytes
    cancel: bytes


class StorageServer(ABC):
    """One storage server as the client sees it, identified for placement and secrets.

    `server_id` names it in logs and maps; `tubid` (20 bytes) is what lease and write-enabler secrets are
    derived from; `permutation_seed` places it on each storage index's ring.
    """

    server_id: str
    nickname: str
    tubid: bytes
    permutation_seed: bytes

    @abstractmethod
    async def get_version(self) -> ServerVersion: ...

    @abstractmethod
    async def allocate_buckets(
        self,
        storage_index: bytes,
        lease: LeaseSecrets,
        upload_secret: bytes,
        share_numbers: set[int],
        allocated_size: int,
    ) -> AllocationResult: ...

    @abstractmethod
    async def write_share_chunk(
        self, storage_index: bytes, shnum: int, upload_secret: bytes, offset: int, data: bytes | memoryview
    ) -> bool:
        """Write bytes of an immutable share being uploaded; True once every byte has arrived."""

    @abstractmethod
    async def abort_upload(self, storage_index: bytes, shnum: int, upload_secret: bytes) -> None: ...

    @abstractmethod
    async def list_immutable_shares(self, storage_index: bytes) -> set[int]: ...

    @abstractmethod
    async def read_immutable_share(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a share, short at its end; ShareNotFoundError if absent."""

    @abstractmethod
    async def advise_corrupt_immutable(self, storage_index: bytes, shnum: int, reason: str) -> None: ...

    @abstractmethod
    async def add_or_renew_lease(self, storage_index: bytes, lease: LeaseSecrets) -> None: ...

    @abstractmethod
    async def read_test_write(
        self,
        storage_index: bytes,
        write_enabler: bytes,
        lease: LeaseSecrets,
        vectors: dict[int, TestAndWrite],
        read_vector: Sequence[tuple[int, int]],
    ) -> ReadTestWriteResult: ...

    @abstractmethod
    async def list_mutable_shares(self, storage_index: bytes) -> set[int]: ...

    @abstractmethod
    async def read_mutable_share(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes: ...

    @abstractmethod
    async def advise_corrupt_mutable(self, storage_index: bytes, shnum: int, reason: str) -> None: ...

    async def aclose(self) -> None:  # noqa: B027 - optional: only network clients hold resources
        """Release connections."""
