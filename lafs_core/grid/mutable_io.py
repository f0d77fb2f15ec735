"""Mutable files over a grid: map what the servers hold, read the best version, publish a new one.

Publishing writes every share of the new version where that share number already lives (so old copies do not
linger as a competing version) and places the others along the ring, all with read-test-write requests that
fail if another writer changed a share since it was mapped. Such a failure surfaces as UncoordinatedWriteError
and callers re-read and re-apply their change; nothing another writer wrote is ever overwritten blindly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from .. import base32
from ..caps import MdmfWriteCap, MutableReadCap, MutableVerifierCap, MutableWriteCap
from ..errors import FormatError, NotEnoughSharesError
from ..mutable.encode import EncodedVersion, encode_version
from ..mutable.keys import MDMF, SDMF, WriterKeys, writer_keys_from_share
from ..mutable.layout import MDMF_CHECKSTRING_SIZE, MDMF_VERSION, SDMF_VERSION, NeedMoreData, SignedPrefix
from ..mutable.publish import UncoordinatedWriteError, next_seqnum, publish_vectors
from ..mutable.retrieve import INITIAL_READ_SIZE, MutableReader, ServerMap, ShareRef, UnrecoverableFileError, readkey_of
from .download import advise_corrupt, drive_async, share_fetcher
from .grid import Grid, gather_per_server, no_server_answered, summarize_failures
from .selection import happiness, spread
from .server_api import StorageServer, StorageServerError
from .upload import UploadUnhappyError

log = logging.getLogger("blackmatch.mutable")

AnyMutableCap = MutableWriteCap | MutableReadCap | MutableVerifierCap
PUBLISH_ROUNDS = 3


async def map_servers(grid: Grid, cap: AnyMutableCap) -> ServerMap:
    """Read the start of every share of this file on every server and check each one."""
    storage_index = cap.storage_index
    servermap = ServerMap(cap.fingerprint)

    async def survey(server: StorageServer) -> None:
        shnums = await server.list_mutable_shares(storage_index)
        servermap.add_server(server.server_id)
        for shnum in sorted(shnums):
            ref = ShareRef(server.server_id, shnum)
            data = await server.read_mutable_share(storage_index, shnum, 0, INITIAL_READ_SIZE)
            try:
                servermap.add_share(ref, data)
            except NeedMoreData as need:
                servermap.add_share(ref, await server.read_mutable_share(storage_index, shnum, 0, need.length))

    results = await gather_per_server(grid.servers, survey, timeout=60)
    for server_id, result in results.items():
        if isinstance(result, Exception):
            log.info("mapping %s on %s failed: %s", base32.encode(storage_index)[:8], server_id, result)
            servermap.unanswered[server_id] = str(result)
    return servermap


async def read_version(
    grid: Grid, cap: MutableWriteCap | MutableReadCap, servermap: ServerMap, version: SignedPrefix
) -> bytes:
    """The plaintext of one version, every block checked."""
    reader = MutableReader(readkey_of(cap), servermap, version)
    servers = {s.server_id: s for s in grid.servers}
    try:
        fetch = share_fetcher(servers, cap.storage_index, mutable=True)
        return await drive_async(reader.read(0, version.data_length), fetch)
    finally:
        await advise_corrupt(reader.corrupt_shares, servers, cap.storage_index, True, set())


async def retrieve(grid: Grid, cap: MutableWriteCap | MutableReadCap) -> tuple[bytes, ServerMap, SignedPrefix]:
    """The best recoverable version's contents, with the map used (a later publish needs it)."""
    servermap = await map_servers(grid, cap)
    while (version := servermap.best_version()) is not None:
        try:
            return await read_version(grid, cap, servermap, version), servermap, version
        except NotEnoughSharesError as exc:
            for ref in servermap.shares_of(version):  # this version turned out unreadable: try the next best
                servermap.bad_shares[ref] = str(exc)
                servermap.headers.pop(ref, None)
    if not servermap.servers_seen and servermap.unanswered:
        raise no_server_answered(list(servermap.unanswered.values()))
    reasons = "".join(f"; share {ref}: {why}" for ref, why in sorted(servermap.bad_shares.items()))
    raise UnrecoverableFileError(
        f"no recoverable version of mutable file {base32.encode(cap.storage_index)[:8]} "
        f"({len(servermap.headers)} good shares on {len(servermap.servers_seen)} servers{reasons})"
    )


def _placements(
    grid: Grid,
    servermap: ServerMap | None,
    storage_index: bytes,
    wanted: set[int],
    unusable: set[str],
    failures: dict[str, str],
) -> list[ShareRef]:
    """Where to write the wanted share numbers: wherever a copy was seen, else spread along the ring."""
    seen = list(servermap.headers) + list(servermap.bad_shares) if servermap else []
    refs = {ref for ref in seen if ref.shnum in wanted and ref.server not in unusable}
    homeless = sorted(wanted - {ref.shnum for ref in refs})
    if homeless:
        ring = [s.server_id for s in grid.permuted(storage_index) if s.server_id not in unusable]
        if not ring:
            why = f" ({summarize_failures(list(failures.values()))})" if failures else ""
            raise UploadUnhappyError(f"no storage server is reachable{why}")
        load: dict[str, int] = {}
        for ref in refs:
            load[ref.server] = load.get(ref.server, 0) + 1
        for server_id, shnums in spread(homeless, ring, load).items():
            refs.update(ShareRef(server_id, shnum) for shnum in shnums)
    return sorted(refs)


@dataclass(frozen=True)
class Published:
    """A version written: its signed prefix, and where its shares went (server id -> share numbers)."""

    prefix: SignedPrefix
    written: dict[str, set[int]]


async def publish(
    grid: Grid,
    keys: WriterKeys,
    plaintext: bytes,
    servermap: ServerMap | None,
    file_format: str,
    needed: int | None = None,
    total: int | None = None,
) -> SignedPrefix:
    """Write a new version; UncoordinatedWriteError if another writer got there first on any share."""
    published = await publish_version(grid, keys, plaintext, servermap, file_format, needed, total)
    return published.prefix


async def publish_version(
    grid: Grid,
    keys: WriterKeys,
    plaintext: bytes,
    servermap: ServerMap | None,
    file_format: str,
    needed: int | None = None,
    total: int | None = None,
) -> Published:
    """`publish`, telling where each share of the new version was written (repair reports it)."""
    needed = needed or grid.encoding.needed
    total = min(total or grid.encoding.total, 255)
    version_number = MDMF_VERSION if file_format == MDMF else SDMF_VERSION
    seqnum = next_seqnum(servermap)
    encoded = await trio.to_thread.run_sync(
        lambda: encode_version(keys, seqnum, plaintext, needed, total, version_number)
    )
    servers = {s.server_id: s for s in grid.servers}
    # Servers that did not answer while mapping may hold shares we cannot test against: leave them out.
    unusable = {sid for sid in servers if servermap is not None and sid not in servermap.servers_seen}
    written: dict[str, set[int]] = {}
    failures = dict(servermap.unanswered) if servermap is not None else {}  # why servers are unusable
    wanted = set(range(total))
    for _round in range(PUBLISH_ROUNDS):
        refs = _placements(grid, servermap, keys.storage_index, wanted, unusable, failures)
        await _write_round(grid, keys, encoded, servermap, refs, unusable, written, failures)
        wanted -= {shnum for shares in written.values() for shnum in shares}
        if not wanted:
            break
    achieved = happiness(written)
    required = min(grid.encoding.happy, len(grid.servers))
    if wanted or achieved < required:
        raise UploadUnhappyError(
            f"new version of mutable file {base32.encode(keys.storage_index)[:8]} reached happiness {achieved} "
            f"(need {required}); {len(wanted)} shares have no server"
        )
    return Published(encoded.prefix, written)


async def _write_round(
    grid: Grid,
    keys: WriterKeys,
    encoded: EncodedVersion,
    servermap: ServerMap | None,
    refs: list[ShareRef],
    unusable: set[str],
    written: dict[str, set[int]],
    failures: dict[str, str],
) -> None:
    by_server: dict[str, list[ShareRef]] = {}
    for ref in refs:
        by_server.setdefault(ref.server, []).append(ref)
    servers = {s.server_id: s for s in grid.servers}
    storage_index = keys.storage_index

    async def write(server: StorageServer) -> bool:
        mine = by_server[server.server_id]
        vectors = publish_vectors(encoded.shares, mine, servermap)
        result = await server.read_test_write(
            storage_index,
            grid.write_enabler(keys.writekey, server),
            grid.lease(storage_index, server),
            {ref.shnum: vectors[ref] for ref in mine},
            [(0, MDMF_CHECKSTRING_SIZE)],
        )
        return result.success

    results = await gather_per_server([servers[sid] for sid in by_server], write, timeout=120)
    collided = []
    for server_id, result in results.items():
        if result is True:
            written.setdefault(server_id, set()).update(ref.shnum for ref in by_server[server_id])
        elif result is False:
            collided.append(servers[server_id].nickname)
        else:
            log.info("publish to %s failed: %s", servers[server_id].nickname, result)
            unusable.add(server_id)
            failures[server_id] = str(result)
    if collided:
        raise UncoordinatedWriteError(
            f"another writer changed mutable file {base32.encode(storage_index)[:8]} on {', '.join(collided)}"
        )


async def create_mutable(grid: Grid, plaintext: bytes, file_format: str | None = None) -> MutableWriteCap:
    """A new mutable file holding `plaintext`; returns its write cap."""
    file_format = (file_format or grid.mutable_format).upper()
    keys = WriterKeys.from_private_key(await grid.private_key())
    await publish(grid, keys, plaintext, None, file_format)
    grid.remember_writer(keys)
    return keys.cap(file_format)


async def writer_keys(grid: Grid, cap: MutableWriteCap, servermap: ServerMap) -> WriterKeys:
    """The writer's keys: those the grid already knows, else recovered from the encrypted private key the
    shares carry.

    MDMF shares carry it near the start, so mapping read it; an SDMF share keeps it at its end, which is
    fetched from one server when the share was larger than the mapping read.
    """
    known = grid.known_writer(cap.storage_index)
    if known is not None and known.writekey == cap.writekey:
        return known
    for ref, header in sorted(servermap.headers.items()):
        encrypted = header.enc_privkey
        if not encrypted:
            offsets = header.offsets
            try:
                encrypted = await grid.server(ref.server).read_mutable_share(
                    cap.storage_index, ref.shnum, offsets.enc_privkey, offsets.eof - offsets.enc_privkey
                )
            except StorageServerError as exc:
                log.info("reading the private key from %s failed: %s", ref.server, exc)
                continue
        try:
            keys = writer_keys_from_share(cap, encrypted)
        except FormatError as exc:
            log.warning("share %s carries a bad private key: %s", ref, exc)
            continue
        grid.remember_writer(keys)
        return keys
    raise UnrecoverableFileError("no share yields the file's private key")


async def overwrite(grid: Grid, cap: MutableWriteCap, plaintext: bytes, servermap: ServerMap | None = None) -> None:
    """Replace the contents of a mutable file (mapping it first unless a fresh map is given)."""
    servermap = servermap or await map_servers(grid, cap)
    version = servermap.best_version()
    file_format = MDMF if isinstance(cap, MdmfWriteCap) else SDMF
    await publish(
        grid,
        await writer_keys(grid, cap, servermap),
        plaintext,
        servermap,
        file_format,
        version.needed if version else None,
        version.total if version else None,
    )
