"""A client's view of one grid: its storage servers, its secrets and its encoding parameters.

Everything that talks to servers (upload, download, mutable publish and retrieve, directories) takes a Grid.
It derives the per-server secrets exactly as Tahoe does, from the node's lease secret and each server's
TubID, so leases and write enablers set by blackmatch are the ones a Tahoe client would present.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from .. import rsa
from ..errors import NotEnoughSharesError
from ..hashes import (
    bucket_cancel_secret_hash,
    bucket_renewal_secret_hash,
    file_cancel_secret_hash,
    file_renewal_secret_hash,
    my_cancel_secret_hash,
    my_renewal_secret_hash,
    tagged_pair_hash,
)
from ..immutable.params import DEFAULT_MAX_SEGMENT_SIZE
from ..mutable.keys import WriterKeys, write_enabler
from .key_pool import KeyPool
from .nodedir import EncodingConfig
from .selection import permuted
from .server_api import LeaseSecrets, ServerUnavailableError, StorageServer, StorageServerError

log = logging.getLogger("blackmatch.grid")
T = TypeVar("T")

KNOWN_WRITERS = 1024
"""Mutable files and directories whose loaded keys a Grid keeps (a few KiB each), most recently used."""


@dataclass
class Grid:
    """Servers plus the secrets and settings an upload or download needs."""

    servers: list[StorageServer]
    convergence: bytes
    lease_secret: bytes
    encoding: EncodingConfig
    mutable_format: str = "sdmf"
    max_segment_size: int = DEFAULT_MAX_SEGMENT_SIZE
    keys: KeyPool = field(default_factory=lambda: KeyPool(rsa.generate_private_key))
    known_writers: OrderedDict[bytes, WriterKeys] = field(default_factory=OrderedDict, init=False, repr=False)
    _upload_locks: dict[bytes, trio.Lock] = field(default_factory=dict, init=False, repr=False)
    stored_bytes: int = field(default=0, init=False)
    """Share bytes servers have accepted from uploads so far: tells a slow upload from one that is stuck."""

    def permuted(self, storage_index: bytes) -> list[StorageServer]:
        return permuted(self.servers, storage_index)

    def server(self, server_id: str) -> StorageServer:
        for server in self.servers:
            if server.server_id == server_id:
                return server
        raise KeyError(server_id)

    def lease(self, storage_index: bytes, server: StorageServer) -> LeaseSecrets:
        """The lease secrets for one share set on one server: client secret -> file secret -> bucket secret."""
        renew = file_renewal_secret_hash(my_renewal_secret_hash(self.lease_secret), storage_index)
        cancel = file_cancel_secret_hash(my_cancel_secret_hash(self.lease_secret), storage_index)
        return LeaseSecrets(
            bucket_renewal_secret_hash(renew, server.tubid), bucket_cancel_secret_hash(cancel, server.tubid)
        )

    def upload_secret(self, storage_index: bytes) -> bytes:
        """This client's upload secret for one file: the same on every attempt, so a retry after a crash can
        abort the buckets the dead attempt left (they would block those share numbers for a long while);
        secret, because it is derived from the node's lease secret. blackmatch's own tag, not Tahoe's: Tahoe
        uses a random secret per upload, and servers only compare it."""
        return tagged_pair_hash(b"blackmatch_upload_secret_v1", self.lease_secret, storage_index)

    @contextlib.asynccontextmanager
    async def uploading(self, storage_index: bytes) -> AsyncIterator[None]:
        """Held while one file is uploaded: uploads of identical content in this process take turns (they share
        the upload secret, so one must not abort the other's buckets; the second finds the shares there)."""
        lock = self._upload_locks.setdefault(storage_index, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._upload_locks.pop(storage_index, None)

    def write_enabler(self, writekey: bytes, server: StorageServer) -> bytes:
        return write_enabler(writekey, server.tubid)

    async def private_key(self) -> RSAPrivateKey:
        """A fresh RSA key for a new mutable file or directory (a spare one when the pool has it)."""
        return await self.keys.take()

    def remember_writer(self, keys: WriterKeys) -> None:
        """Keep a writer's keys, so the next update of that file neither fetches nor loads its private key."""
        self.known_writers[keys.storage_index] = keys
        self.known_writers.move_to_end(keys.storage_index)
        while len(self.known_writers) > KNOWN_WRITERS:
            self.known_writers.popitem(last=False)

    def known_writer(self, storage_index: bytes) -> WriterKeys | None:
        keys = self.known_writers.get(storage_index)
        if keys is not None:
            self.known_writers.move_to_end(storage_index)
        return keys

    async def aclose(self) -> None:
        for server in self.servers:
            await server.aclose()


class NoServerAnsweredError(NotEnoughSharesError):
    """Not one storage server answered: the grid, or the way to it, is down, and nothing is known of the file."""


def no_server_answered(failures: list[str]) -> NoServerAnsweredError:
    return NoServerAnsweredError(f"no storage server answered ({summarize_failures(failures)})")


def summarize_failures(failures: list[str], shown: int = 3) -> str:
    """Servers' failures (each naming its server) for a one-line message: the first few, then how many more."""
    more = len(failures) - shown
    return "; ".join(failures[:shown]) + (f"; and {more} more" if more > 0 else "")


async def gather_per_server(
    servers: Iterable[StorageServer], call: Callable[[StorageServer], Awaitable[T]], timeout: float | None = None
) -> dict[str, T | StorageServerError]:
    """Run `await call(server)` for every server at once; map server id -> result or the exception raised."""
    results: dict[str, T | StorageServerError] = {}

    async def one(server: StorageServer) -> None:
        try:
            with trio.fail_after(timeout) if timeout else contextlib.nullcontext():
                results[server.server_id] = await call(server)
        except trio.TooSlowError:
            results[server.server_id] = ServerUnavailableError(f"{server.nickname}: no answer in {timeout} s")
        except StorageServerError as exc:
            results[server.server_id] = exc

    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(one, server)
    return results
