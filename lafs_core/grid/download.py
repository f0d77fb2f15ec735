"""Immutable download: find the shares, then drive the verifying decoder over the servers holding them.

Every copy of every share found is offered to the decoder as (server, share number), fastest-answering
servers first, so it reads k shares from the quickest servers and switches to another copy or share when one
is missing, unreadable or corrupt. Shares that fail verification are reported to their server with a
corruption advisory. Only the segments a read covers are fetched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Generator, Hashable, Mapping
from typing import TypeVar

import trio

from .. import base32
from ..caps import ChkCap, LiteralCap
from ..errors import NotEnoughSharesError, sole_exception
from ..fetch import FetchBatch, FetchResults, Span
from ..immutable.decode import ChkReader
from ..mutable.retrieve import ShareRef
from .grid import Grid, no_server_answered, summarize_failures
from .server_api import StorageServer, StorageServerError

log = logging.getLogger("blackmatch.download")

T = TypeVar("T")
Fetch = Callable[[Hashable, list[Span]], Awaitable[list[bytes]]]

READAHEAD_SEGMENTS = 4


async def drive_async(steps: Generator[FetchBatch, FetchResults, T], fetch: Fetch) -> T:
    """Run a reader generator, fetching each batch's reads concurrently."""
    try:
        batch = next(steps)
        while True:
            results: dict[Hashable, list[bytes] | BaseException] = {}

            async def one(
                key: Hashable, spans: list[Span], results: dict[Hashable, list[bytes] | BaseException] = results
            ) -> None:
                try:
                    results[key] = await fetch(key, spans)
                except StorageServerError as exc:
                    results[key] = exc

            async with trio.open_nursery() as nursery:
                for key, spans in batch.requests.items():
                    nursery.start_soon(one, key, spans)
            batch = steps.send(results)
    except StopIteration as done:
        value: T = done.value  # what the generator returned
        return value


async def read_spans(read: Callable[[int, int], Awaitable[bytes]], spans: list[Span]) -> list[bytes]:
    """All spans of one share, requested at once."""
    out: list[bytes] = [b""] * len(spans)

    async def one(i: int, offset: int, length: int) -> None:
        out[i] = await read(offset, length)

    async with trio.open_nursery() as nursery:
        for i, (offset, length) in enumerate(spans):
            nursery.start_soon(one, i, offset, length)
    return out


def share_fetcher(servers: dict[str, StorageServer], storage_index: bytes, mutable: bool) -> Fetch:
    """How a reader's requests for a share named by ShareRef are served: every span from its server at once."""

    async def fetch(key: Hashable, spans: list[Span]) -> list[bytes]:
        assert isinstance(key, ShareRef)
        server = servers[key.server]
        read = server.read_mutable_share if mutable else server.read_immutable_share
        return await read_spans(lambda offset, length: read(storage_index, key.shnum, offset, length), spans)

    return fetch


async def advise_corrupt(
    corrupt_shares: Mapping[Hashable, str],
    servers: dict[str, StorageServer],
    storage_index: bytes,
    mutable: bool,
    already: set[Hashable],
) -> None:
    """Tell each server about its shares that failed verification (once per share), with the reason."""
    for key, reason in list(corrupt_shares.items()):
        if key in already or not isinstance(key, ShareRef):
            continue
        already.add(key)
        server = servers[key.server]
        log.warning(
            "share %d of %s on %s is corrupt: %s", key.shnum, base32.encode(storage_index)[:8], server.nickname, reason
        )
        try:
            if mutable:
                await server.advise_corrupt_mutable(storage_index, key.shnum, reason[:1000])
            else:
                await server.advise_corrupt_immutable(storage_index, key.shnum, reason[:1000])
        except StorageServerError as exc:
            log.info("corruption advisory to %s failed: %s", server.nickname, exc)


class ImmutableFile:
    """Verified reads of one CHK file over a grid; keeps what it learned (share locations, checked hashes)."""

    def __init__(self, grid: Grid, cap: ChkCap, trusted: Mapping[int, frozenset[str]] | None = None) -> None:
        """`trusted`, when given, maps share number -> servers: only those copies are read (a repair reads the
        shares its check verified, not the copies it found corrupt)."""
        self.grid = grid
        self.cap = cap
        self._trusted = trusted
        self.storage_index = cap.storage_index
        self._reader: ChkReader | None = None
        self._servers = {s.server_id: s for s in grid.servers}
        self._advised: set[Hashable] = set()
        self._fetch = share_fetcher(self._servers, self.storage_index, mutable=False)
        self._lock = trio.Lock()

    async def _locate(self) -> ChkReader:
        async with self._lock:
            if self._reader is None:
                reader = ChkReader(self.cap)
                started = time.monotonic()
                answered: list[tuple[float, str, set[int]]] = []
                failures: list[str] = []

                async def ask(server: StorageServer) -> None:
                    try:
                        with trio.fail_after(30):
                            shnums = await server.list_immutable_shares(self.storage_index)
                    except (StorageServerError, trio.TooSlowError) as exc:
                        log.info("share query to %s failed: %s", server.nickname, exc)
                        failures.append(str(exc) or f"{server.nickname}: no answer in 30 s")
                        return
                    answered.append((time.monotonic() - started, server.server_id, shnums))

                async with trio.open_nursery() as nursery:
                    for server in self.grid.permuted(self.storage_index):
                        nursery.start_soon(ask, server)
                if not answered and failures:
                    raise no_server_answered(failures)
                if not any(shnums for _elapsed, _server, shnums in answered):  # asked again next time
                    silent = f"; {len(failures)} did not answer: {summarize_failures(failures)}" if failures else ""
                    raise NotEnoughSharesError(
                        f"no share of this file on the {len(answered)} servers that answered "
                        f"(the cap may be mistyped, or the file gone){silent}"
                    )
                for _elapsed, server_id, shnums in sorted(answered):
                    for shnum in sorted(shnums):
                        if self._trusted is not None and server_id not in self._trusted.get(shnum, ()):
                            continue
                        reader.add_share(ShareRef(server_id, shnum), shnum)
                self._reader = reader
            return self._reader

    async def _run(self, steps: Generator[FetchBatch, FetchResults, T]) -> T:
        reader = await self._locate()
        try:
            return await drive_async(steps, self._fetch)
        finally:
            await advise_corrupt(reader.corrupt_shares, self._servers, self.storage_index, False, self._advised)

    async def read(self, start: int = 0, end: int | None = None) -> bytes:
        reader = await self._locate()
        return await self._run(reader.read(start, self.cap.size if end is None else end))

    async def segment(self, segnum: int) -> bytes:
        reader = await self._locate()
        return await self._run(reader.segment(segnum))

    async def segment_size(self) -> int:
        reader = await self._locate()
        await self._run(reader.open())
        return reader.segment_size

    async def copy_to(self, sink: Callable[[bytes], Awaitable[object]], start: int = 0, end: int | None = None) -> None:
        """Feed plaintext [start, end) to `sink` in order, fetching up to READAHEAD_SEGMENTS segments ahead.

        A segment is fetched only when the one READAHEAD_SEGMENTS before it has been handed to the sink, so
        memory stays at a few segments however slow the sink is.
        """
        end = self.cap.size if end is None else min(end, self.cap.size)
        if start >= end:
            return
        segsize = await self.segment_size()
        first, last = start // segsize, (end - 1) // segsize
        results: dict[int, bytes] = {}
        ready = {n: trio.Event() for n in range(first, last + 1)}

        async def fetch(segnum: int) -> None:
            results[segnum] = await self.segment(segnum)
            ready[segnum].set()

        try:
            async with trio.open_nursery() as nursery:
                for segnum in range(first, min(first + READAHEAD_SEGMENTS, last + 1)):
                    nursery.start_soon(fetch, segnum)
                for segnum in range(first, last + 1):
                    await ready[segnum].wait()
                    if segnum + READAHEAD_SEGMENTS <= last:
                        nursery.start_soon(fetch, segnum + READAHEAD_SEGMENTS)
                    data = results.pop(segnum)
                    seg_start = segnum * segsize
                    await sink(data[max(start - seg_start, 0) : end - seg_start])
        except BaseExceptionGroup as group:  # the caller gets the LafsError of a fetch, or the sink's own error
            raise sole_exception(group) from None


async def read_immutable(grid: Grid, cap: ChkCap | LiteralCap, start: int = 0, end: int | None = None) -> bytes:
    if isinstance(cap, LiteralCap):
        return cap.data[start:end]
    return await ImmutableFile(grid, cap).read(start, end)
