"""Immutable upload: place shares for servers-of-happiness, then stream the encoder's writes to them.

Memory stays bounded: the encoder runs in a worker thread (on the event loop for files up to INLINE_LIMIT, where a
thread costs more than the work) a couple of segments ahead of the network, and each share's writes are coalesced
into requests of about WRITE_COALESCE bytes. Each share has at most one request in flight while its next one
gathers, so shares and servers move independently (no round waits for the slowest server) and the encoder keeps
working while requests are out; a share whose previous request has not finished when the next one is ready holds
the stream back. A server that fails mid-upload loses its shares; the upload carries on while the rest still meet
happiness and otherwise aborts every writer and raises, so no cap is ever returned for a file the grid does not
hold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import trio

from .. import base32
from ..caps import Cap, ChkCap, LiteralCap
from ..errors import LafsError
from ..hashes import storage_index_hash
from ..immutable.encode import ChkEncoder, ShareWrite, convergent_key
from ..immutable.params import LIT_THRESHOLD, ChkParameters
from .grid import Grid, gather_per_server
from .selection import by_server, happiness, spread
from .server_api import AllocationResult, StorageServer, StorageServerError

log = logging.getLogger("blackmatch.upload")

WRITE_COALESCE = 1024 * 1024
"""Per-share bytes gathered into one write request."""

SEGMENTS_AHEAD = 2
"""How many encoded segments may wait for the network: the upload's memory bound."""

INLINE_LIMIT = 128 * 1024
"""Files up to this size are hashed and encoded on the event loop (a millisecond or two): handing the work to a
thread costs more than doing it, which is what many small files need."""

OpenChunks = Callable[[], Iterator[bytes]]


class UploadUnhappyError(LafsError):
    """The shares could not be spread over enough servers to meet the happiness requirement."""


@dataclass
class _ShareWriter:
    """One share being uploaded to one server, with its not-yet-sent contiguous bytes."""

    server: StorageServer
    shnum: int
    pending_offset: int = 0
    pending: list[bytes | memoryview] = field(default_factory=list)
    pending_size: int = 0
    complete: bool = False
    failed: bool = False
    in_flight: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(1))
    """Held while a write request of this share is out: its requests go one at a time, in order."""


@dataclass
class Placement:
    """Which server writes which share, and which shares servers already hold (from an earlier upload)."""

    writers: dict[int, _ShareWriter]
    already_held: dict[str, set[int]]
    refusals: list[str] = field(default_factory=list)  # why servers took no share (errors name their server)

    def holdings(self) -> dict[str, set[int]]:
        held = {server: set(shares) for server, shares in self.already_held.items()}
        for writer in self.writers.values():
            held.setdefault(writer.server.server_id, set()).add(writer.shnum)
        return held


@dataclass(frozen=True)
class PlacementGoal:
    """What a placement aims for: N shares, spread for happiness; and what happiness it must reach."""

    total: int
    happy: int
    required: int
    """Below this happiness the upload fails and aborts. Repair asks for 0: every share it places adds
    redundancy, even when the grid has too few servers left to be happy (Tahoe's repairer does the same)."""
    known: Mapping[int, frozenset[str]] | None = None
    """Share number -> servers known to hold a good copy (repair: what the checker found). Given, it is the
    only holding believed: a server's claim to hold any other share (a corrupt copy) puts that share elsewhere."""

    @classmethod
    def of(cls, grid: Grid) -> PlacementGoal:
        """An ordinary upload's goal: the node's N and happiness, both required."""
        return cls(grid.encoding.total, grid.encoding.happy, grid.encoding.happy)

    def believes(self, server_id: str, shnum: int) -> bool:
        return self.known is None or server_id in self.known.get(shnum, frozenset())


async def allocate_shares(
    grid: Grid, storage_index: bytes, share_size: int, upload_secret: bytes, goal: PlacementGoal | None = None
) -> Placement:
    """Ask servers along the ring for buckets until every share has a home, or no server is left to ask; then,
    if that is not happy enough, move shares onto servers that hold none."""
    goal = goal or PlacementGoal.of(grid)
    total = goal.total
    ring = grid.permuted(storage_index)
    writers: dict[int, _ShareWriter] = {}
    held = by_server(goal.known or {})
    errored: set[str] = set()
    declined: dict[str, set[int]] = {}  # share numbers a server would not take (no room, or another upload's)
    refusals: list[str] = []

    async def ask(server: StorageServer, wanted: set[int]) -> AllocationResult:
        lease = grid.lease(storage_index, server)
        return await server.allocate_buckets(storage_index, lease, upload_secret, wanted, share_size)

    def record(server: StorageServer, wanted: Iterable[int], result: object) -> None:
        if isinstance(result, Exception):
            log.info("server %s refused allocation: %s", server.nickname, result)
            errored.add(server.server_id)
            refusals.append(str(result))
            return
        assert isinstance(result, AllocationResult)
        believed = {shnum for shnum in result.already_have if goal.believes(server.server_id, shnum)}
        if believed:
            held.setdefault(server.server_id, set()).update(believed)
        for shnum in result.allocated:
            writers[shnum] = _ShareWriter(server, shnum)
        missed = set(wanted) - set(result.allocated) - believed
        if missed:
            declined.setdefault(server.server_id, set()).update(missed)

    async def reclaim(server: StorageServer, shnums: set[int]) -> None:
        """Abort buckets of ours a dead attempt left (same secret), so their share numbers are free again."""
        for shnum in sorted(shnums):
            try:
                await server.abort_upload(storage_index, shnum, upload_secret)
            except StorageServerError:
                continue  # not ours (another client's upload), or no room: stays declined
            log.info("aborted an earlier attempt's bucket %d on %s", shnum, server.nickname)
            declined[server.server_id].discard(shnum)
        if not declined[server.server_id]:
            del declined[server.server_id]

    homeless = [s for s in range(total) if not any(s in shares for shares in held.values())]
    candidates = ring[: max(total, 1)]
    reclaimed: set[str] = set()
    while homeless:
        usable = [s for s in candidates if s.server_id not in errored and s.server_id not in declined]
        if not usable:
            extra = [s for s in ring if s not in candidates]
            if not extra:
                break
            candidates += extra
            continue
        load = {sid: len(shares) for sid, shares in held.items()}
        for writer in writers.values():
            load[writer.server.server_id] = load.get(writer.server.server_id, 0) + 1
        assignment = spread(homeless, [s.server_id for s in usable], load)
        by_id = {s.server_id: s for s in usable}
        results = await gather_per_server([by_id[sid] for sid in assignment], _asking(ask, assignment), timeout=60)
        for server_id, result in results.items():
            record(by_id[server_id], assignment[server_id], result)
            if server_id in declined and server_id not in reclaimed:
                reclaimed.add(server_id)
                await reclaim(by_id[server_id], set(declined[server_id]))
        placed = set(writers) | {s for shares in held.values() for s in shares}
        homeless = [s for s in range(total) if s not in placed]
    placement = Placement(writers, held, refusals)
    await _rebalance(grid, storage_index, upload_secret, ring, placement, goal.happy, errored, declined, ask, record)
    return placement


Ask = Callable[[StorageServer, set[int]], Awaitable[AllocationResult]]
"""ask(server, share numbers): allocate buckets for them there."""


def _asking(ask: Ask, wanted: Mapping[str, Iterable[int]]) -> Callable[[StorageServer], Awaitable[AllocationResult]]:
    """`ask` for each server's share numbers in `wanted`, as `gather_per_server` calls it."""
    return lambda server: ask(server, set(wanted[server.server_id]))


async def _rebalance(
    grid: Grid,
    storage_index: bytes,
    upload_secret: bytes,
    ring: list[StorageServer],
    placement: Placement,
    happy: int,
    errored: set[str],
    declined: dict[str, set[int]],
    ask: Ask,
    record: Callable[[StorageServer, Iterable[int], object], None],
) -> None:
    """Give servers that hold no share one from a server holding several, until happy or out of moves.

    A server that declined some share numbers may take others: the usual cause is another upload of the same
    file in progress there (a client killed mid-upload leaves its buckets for a while), which blocks only the
    share numbers that upload had. A share being written elsewhere moves (its old bucket is aborted); one
    already stored elsewhere is written once more.
    """
    while happiness(holdings := placement.holdings()) < happy:
        idle = [s for s in ring if s.server_id not in holdings and s.server_id not in errored]
        crowded = sorted(
            ((server_id, shnum) for server_id, shnums in holdings.items() if len(shnums) > 1 for shnum in shnums),
            key=lambda pair: (-len(holdings[pair[0]]), pair[1]),
        )
        move = next(
            (
                (server, shnum)
                for server in idle
                for _, shnum in crowded
                if shnum not in declined.get(server.server_id, set())
            ),
            None,
        )
        if move is None:
            return
        server, shnum = move
        old = placement.writers.get(shnum)
        results = await gather_per_server([server], _asking(ask, {server.server_id: [shnum]}), timeout=60)
        record(server, {shnum}, results[server.server_id])
        if old is not None and placement.writers.get(shnum) is not old:  # moved: free the old bucket
            await _abort(grid, storage_index, upload_secret, [old])


async def _abort(grid: Grid, storage_index: bytes, upload_secret: bytes, writers: list[_ShareWriter]) -> None:
    async def abort(writer: _ShareWriter) -> None:
        try:
            await writer.server.abort_upload(storage_index, writer.shnum, upload_secret)
        except StorageServerError as exc:
            log.info("abort on %s failed: %s", writer.server.nickname, exc)

    async with trio.open_nursery() as nursery:
        for writer in writers:
            nursery.start_soon(abort, writer)


def _check_happiness(grid: Grid, placement: Placement, storage_index: bytes, required: int) -> None:
    achieved = happiness(placement.holdings())
    if achieved < required:
        servers = len(placement.holdings())
        why = "".join(f"; {reason}" for reason in placement.refusals)
        raise UploadUnhappyError(
            f"shares of {base32.encode(storage_index)[:8]} reached only {servers} servers, happiness {achieved}; "
            f"need {required} (of {len(grid.servers)} servers configured, "
            f"k={grid.encoding.needed}, N={grid.encoding.total}){why}"
        )


@dataclass(frozen=True)
class UploadedShares:
    """An upload's outcome: the cap, the shares it wrote and where every share now is."""

    cap: ChkCap
    written: dict[int, str]
    """Share number -> server id of each share this upload wrote (shares servers already held are not in it)."""
    holdings: dict[str, set[int]]


async def upload_immutable(grid: Grid, size: int, open_chunks: OpenChunks, *, key: bytes | None = None) -> Cap:
    """Upload a file given as a re-readable stream of chunks; returns its cap once happiness is met.

    Without `key` the convergent key is used, which costs one extra read of the data.
    """
    if size <= LIT_THRESHOLD:
        return LiteralCap(b"".join(open_chunks()))
    enc = grid.encoding
    params = ChkParameters.for_size(size, enc.needed, enc.total, grid.max_segment_size)
    if key is None:
        if size <= INLINE_LIMIT:
            key = convergent_key(open_chunks(), grid.convergence, params)
        else:
            key = await trio.to_thread.run_sync(lambda: convergent_key(open_chunks(), grid.convergence, params))
    uploaded = await upload_encoded(grid, ChkEncoder(key, params), open_chunks, PlacementGoal.of(grid))
    return uploaded.cap


async def upload_encoded(
    grid: Grid, encoder: ChkEncoder, open_chunks: OpenChunks, goal: PlacementGoal
) -> UploadedShares:
    """Place the shares of a fresh encoder's file for `goal` and write those not already held."""
    storage_index = storage_index_hash(encoder.key)
    upload_secret = grid.upload_secret(storage_index)
    async with grid.uploading(storage_index):  # one upload of the same file at a time: they share the secret
        return await _upload(grid, encoder, open_chunks, storage_index, upload_secret, goal)


async def _upload(
    grid: Grid,
    encoder: ChkEncoder,
    open_chunks: OpenChunks,
    storage_index: bytes,
    upload_secret: bytes,
    goal: PlacementGoal,
) -> UploadedShares:
    placement = await allocate_shares(grid, storage_index, encoder.share_size, upload_secret, goal)
    try:
        _check_happiness(grid, placement, storage_index, goal.required)
        await _stream(grid, encoder, open_chunks, storage_index, upload_secret, placement, goal.required)
        _check_happiness(grid, placement, storage_index, goal.required)
        incomplete = [w.shnum for w in placement.writers.values() if not w.complete]
        if incomplete:
            raise LafsError(f"servers did not confirm shares {incomplete} complete")
    except BaseException:
        with trio.CancelScope(shield=True):
            await _abort(grid, storage_index, upload_secret, [w for w in placement.writers.values() if not w.complete])
        raise
    assert isinstance(encoder.cap, ChkCap)
    log.info(
        "uploaded %s: %d bytes, %d shares on %d servers",
        base32.encode(storage_index)[:8],
        encoder.params.size,
        len(placement.writers),
        len(placement.holdings()),
    )
    written = {shnum: writer.server.server_id for shnum, writer in placement.writers.items()}
    return UploadedShares(encoder.cap, written, placement.holdings())


async def _stream(
    grid: Grid,
    encoder: ChkEncoder,
    open_chunks: OpenChunks,
    storage_index: bytes,
    upload_secret: bytes,
    placement: Placement,
    required: int,
) -> None:
    def encoded() -> Iterator[ShareWrite]:
        for chunk in open_chunks():
            yield from encoder.write(chunk)
        yield from encoder.finish()

    send, receive = trio.open_memory_channel[ShareWrite | None](SEGMENTS_AHEAD)

    def produce() -> None:
        for write in encoded():
            trio.from_thread.run(send.send, write)
        trio.from_thread.run(send.send, None)

    async def send_pending(writer: _ShareWriter, offset: int, data: bytes | memoryview) -> None:
        try:
            complete = await writer.server.write_share_chunk(storage_index, writer.shnum, upload_secret, offset, data)
            writer.complete = writer.complete or complete
            grid.stored_bytes += len(data)
        except StorageServerError as exc:
            log.warning("server %s failed during upload: %s", writer.server.nickname, exc)
            writer.failed = True
            placement.writers.pop(writer.shnum, None)
            _check_happiness(grid, placement, storage_index, required)
        finally:
            writer.in_flight.release()

    async def flush(writer: _ShareWriter, senders: trio.Nursery) -> None:
        """Send the writer's pending bytes once its previous request is done, without waiting for this one."""
        if not writer.pending:
            return
        await writer.in_flight.acquire()
        if writer.failed:
            writer.in_flight.release()
            return
        data = b"".join(writer.pending) if len(writer.pending) > 1 else writer.pending[0]
        offset = writer.pending_offset
        writer.pending, writer.pending_size = [], 0
        writer.pending_offset = offset + len(data)
        senders.start_soon(send_pending, writer, offset, data)

    async def consume() -> None:
        async with trio.open_nursery() as senders:
            async for write in receive:
                if write is None:
                    break
                for writer in list(placement.writers.values()):
                    if writer.failed:
                        continue
                    piece = write.data[writer.shnum]
                    if writer.pending and writer.pending_offset + writer.pending_size != write.offset:
                        await flush(writer, senders)
                    if not writer.pending:
                        writer.pending_offset = write.offset
                    writer.pending.append(piece)
                    writer.pending_size += len(piece)
                    if writer.pending_size >= WRITE_COALESCE:
                        await flush(writer, senders)
            for writer in list(placement.writers.values()):
                await flush(writer, senders)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        if encoder.params.size <= INLINE_LIMIT:
            for write in encoded():
                await send.send(write)
            await send.send(None)
        else:
            await trio.to_thread.run_sync(produce, abandon_on_cancel=False)


def file_chunks(path: str | os.PathLike[str], chunk_size: int = 1024 * 1024) -> OpenChunks:
    """A re-readable chunk stream of a local file."""

    def open_chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    return open_chunks


def bytes_chunks(data: bytes) -> OpenChunks:
    return lambda: iter([data])
