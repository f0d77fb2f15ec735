"""Checking a file or directory on the grid, with Tahoe's meaning (`immutable/checker.py`, `mutable/checker.py`).

A check asks every server which shares of the object it holds. With `verify`, every share found is read whole
and every block checked against the hash trees the cap (CHK) or the signed root hash (SDMF, MDMF) vouches for;
a share that fails is corrupt, not good, and its server gets a corruption advisory. With `add_lease`, every
server is asked to renew this client's lease on its shares (or add one).

Health follows Tahoe: a CHK file is healthy when all N share numbers have a good copy; a mutable file when
exactly one version is recoverable, none is unrecoverable, and that version has all N share numbers.
Recoverable means k distinct good shares. Happiness is reported, as Tahoe does, but does not decide health.

The result of a CHK check carries `good_shares` and `corrupt_shares`, which is what a repair starts from.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import trio

from .. import base32
from ..caps import (
    Cap,
    ChkCap,
    ChkVerifierCap,
    DirectoryCap,
    LiteralCap,
    MutableReadCap,
    MutableVerifierCap,
    MutableWriteCap,
)
from ..errors import LafsError
from ..immutable.decode import ChkReader
from ..mutable.layout import SignedPrefix
from ..mutable.retrieve import MutableReader, ServerMap, ShareRef
from .download import Fetch, advise_corrupt, drive_async, share_fetcher
from .grid import Grid, gather_per_server, no_server_answered
from .mutable_io import map_servers
from .selection import by_server, happiness
from .server_api import ShareNotFoundError, StorageServer, StorageServerError

log = logging.getLogger("blackmatch.checker")

SERVER_TIMEOUT = 60
"""Seconds a server may take to list its shares or renew a lease before it counts as not responding."""


@dataclass(frozen=True, order=True)
class CorruptShare:
    """A share that failed verification, and why."""

    server_id: str
    shnum: int
    reason: str


@dataclass(frozen=True)
class CheckResult:
    """What a check found of one object, in the terms of Tahoe's check results.

    `storage_index` is None for a literal object (its content is in its cap: nothing is stored, always healthy).
    `good_shares` maps each share number with a good copy to the servers holding one (for a mutable file: of its
    best recoverable version); `sharemap` is Tahoe's share id -> servers map (share numbers for CHK, version and
    number for mutable files).
    """

    storage_index: bytes | None
    summary: str
    healthy: bool
    recoverable: bool
    needed: int = 0
    expected: int = 0
    good_shares: Mapping[int, frozenset[str]] = field(default_factory=dict)
    corrupt_shares: tuple[CorruptShare, ...] = ()
    servers_responding: frozenset[str] = frozenset()
    sharemap: Mapping[str, frozenset[str]] = field(default_factory=dict)
    wrong_shares: int = 0
    recoverable_versions: int = 0
    unrecoverable_versions: int = 0

    @property
    def good_share_hosts(self) -> int:
        """Servers holding at least one good share."""
        return len(frozenset().union(*self.good_shares.values()))

    @property
    def happiness(self) -> int:
        """How many servers can each contribute a distinct good share (Tahoe's servers of happiness)."""
        return happiness(by_server(self.good_shares))


LITERAL_RESULT = CheckResult(storage_index=None, summary="Healthy (LIT)", healthy=True, recoverable=True)


async def check(grid: Grid, cap: Cap, *, verify: bool = False, add_lease: bool = False) -> CheckResult:
    """Check one object: a file (LIT, CHK, SDMF, MDMF) or a directory (the file that holds it).

    Raises NoServerAnsweredError when not one server answered, and LafsError for a cap that names nothing
    checkable (an unknown kind, or a verify cap asked to `verify`: reading shares whole needs a read cap here).
    """
    inner = cap.file_cap if isinstance(cap, DirectoryCap) else cap
    if isinstance(inner, LiteralCap):
        return LITERAL_RESULT
    if verify and isinstance(inner, ChkVerifierCap | MutableVerifierCap):
        raise LafsError(f"{cap.abbreviated()} is a verify cap: blackmatch verifies only with a read or write cap")
    if isinstance(inner, ChkCap | ChkVerifierCap):
        return await _check_immutable(grid, inner, verify, add_lease)
    if isinstance(inner, MutableWriteCap | MutableReadCap | MutableVerifierCap):
        return await _check_mutable(grid, inner, verify, add_lease)
    raise LafsError(f"{cap.abbreviated()} cannot be checked: blackmatch does not know this kind of cap")


async def renew_leases(grid: Grid, storage_index: bytes) -> dict[str, StorageServerError]:
    """Renew this client's lease (or add one) on every share of `storage_index` on every server, with the
    node's lease secrets. A server holding no share says so and is left alone. Failures are logged, as a check's
    verdict does not depend on them, and returned by server id for callers that report them (background renewal).
    """

    async def renew(server: StorageServer) -> None:
        with contextlib.suppress(ShareNotFoundError):  # it holds none
            await server.add_or_renew_lease(storage_index, grid.lease(storage_index, server))

    results = await gather_per_server(grid.servers, renew, timeout=SERVER_TIMEOUT)
    failures = {server_id: result for server_id, result in results.items() if isinstance(result, StorageServerError)}
    for server_id, failure in failures.items():
        log.info("lease renewal of %s on %s failed: %s", base32.encode(storage_index)[:8], server_id, failure)
    return failures


# --- CHK -------------------------------------------------------------------------------------------------------
async def _check_immutable(grid: Grid, cap: ChkCap | ChkVerifierCap, verify: bool, add_lease: bool) -> CheckResult:
    storage_index = cap.storage_index
    if add_lease:
        await renew_leases(grid, storage_index)
    listed = await gather_per_server(
        grid.servers, lambda server: server.list_immutable_shares(storage_index), timeout=SERVER_TIMEOUT
    )
    held = {sid: shnums for sid, shnums in listed.items() if not isinstance(shnums, Exception)}
    if not held:
        raise no_server_answered([str(failure) for failure in listed.values()])
    refs = [ShareRef(sid, shnum) for sid, shnums in held.items() for shnum in sorted(shnums) if shnum < cap.total]
    corrupt: tuple[CorruptShare, ...] = ()
    if verify:
        assert isinstance(cap, ChkCap)  # check() refuses to verify with a verify cap
        refs, corrupt = await _verify_immutable(grid, cap, refs)
    good: dict[int, set[str]] = {}
    for ref in refs:
        good.setdefault(ref.shnum, set()).add(ref.server)
    healthy = len(good) == cap.total
    summary = "Healthy" if healthy else f"Not Healthy: {len(good)} shares (enc {cap.needed}-of-{cap.total})"
    recoverable = len(good) >= cap.needed
    return CheckResult(
        storage_index=storage_index,
        summary=summary,
        healthy=healthy,
        recoverable=recoverable,
        needed=cap.needed,
        expected=cap.total,
        good_shares={shnum: frozenset(servers) for shnum, servers in sorted(good.items())},
        corrupt_shares=corrupt,
        servers_responding=frozenset(held),
        sharemap={str(shnum): frozenset(servers) for shnum, servers in sorted(good.items())},
        recoverable_versions=int(recoverable),
        unrecoverable_versions=int(not recoverable),
    )


async def _verify_immutable(
    grid: Grid, cap: ChkCap, refs: list[ShareRef]
) -> tuple[list[ShareRef], tuple[CorruptShare, ...]]:
    """The shares among `refs` that pass every check, and the corrupt ones (advised to their servers). A share
    that could not be read (its server went away mid-read) is neither."""
    reader = ChkReader(cap)
    for ref in refs:
        reader.add_share(ref, ref.shnum)
    servers = {server.server_id: server for server in grid.servers}
    good = await _verify_each(reader, refs, share_fetcher(servers, cap.storage_index, mutable=False))
    await advise_corrupt(reader.corrupt_shares, servers, cap.storage_index, False, set())
    return good, _corrupt_of(reader.corrupt_shares.items())


async def _verify_each(reader: ChkReader | MutableReader, refs: list[ShareRef], fetch: Fetch) -> list[ShareRef]:
    """Verify every share at once (each read in full, block by block); the good ones, in the order given."""
    verdicts: dict[ShareRef, str | None] = {}

    async def one(ref: ShareRef) -> None:
        verdicts[ref] = await drive_async(reader.verify_share(ref), fetch)

    async with trio.open_nursery() as nursery:
        for ref in refs:
            nursery.start_soon(one, ref)
    return [ref for ref in refs if verdicts[ref] is None]


def _corrupt_of(bad: Iterable[tuple[Hashable, str]]) -> tuple[CorruptShare, ...]:
    """The corrupt shares among a reader's or a map's bad shares (key, reason), in a stable order."""
    return tuple(sorted(CorruptShare(key.server, key.shnum, why) for key, why in bad if isinstance(key, ShareRef)))


# --- SDMF and MDMF ---------------------------------------------------------------------------------------------
AnyMutableCap = MutableWriteCap | MutableReadCap | MutableVerifierCap


async def _check_mutable(grid: Grid, cap: AnyMutableCap, verify: bool, add_lease: bool) -> CheckResult:
    storage_index = cap.storage_index
    if add_lease:
        await renew_leases(grid, storage_index)
    servermap = await map_servers(grid, cap)
    if not servermap.servers_seen:
        raise no_server_answered(list(servermap.unanswered.values()))
    servers = {server.server_id: server for server in grid.servers}
    best = servermap.best_version()
    if verify and best is not None:
        assert isinstance(cap, MutableWriteCap | MutableReadCap)  # check() refuses to verify with a verify cap
        await _verify_mutable(cap, servermap, best, servers)
    # Shares whose signature or key failed while mapping are corrupt too, verified or not.
    found_bad: dict[Hashable, str] = {ref: why for ref, why in servermap.bad_shares.items()}
    await advise_corrupt(found_bad, servers, storage_index, True, set())
    return _mutable_result(grid, storage_index, servermap)


async def _verify_mutable(
    cap: MutableWriteCap | MutableReadCap,
    servermap: ServerMap,
    version: SignedPrefix,
    servers: dict[str, StorageServer],
) -> None:
    """Read every share of the best version whole and check it; take the corrupt ones out of the map (into its
    bad shares) and the unreadable ones too, so neither counts as good."""
    reader = MutableReader(cap.readkey, servermap, version)
    refs = servermap.shares_of(version)
    good = set(await _verify_each(reader, refs, share_fetcher(servers, cap.storage_index, mutable=True)))
    for ref in refs:
        if ref not in good:
            servermap.headers.pop(ref, None)
    servermap.bad_shares.update({key: why for key, why in reader.corrupt_shares.items() if isinstance(key, ShareRef)})


def _version_name(version: SignedPrefix) -> str:
    """How Tahoe names a version in share ids: sequence number and the start of the root hash."""
    return f"seq{version.seqnum}-{base32.encode(version.root_hash)[:4]}"


def _mutable_result(grid: Grid, storage_index: bytes, servermap: ServerMap) -> CheckResult:
    """Tahoe's verdict on a mapped mutable file (`MutableChecker._make_checker_results`)."""
    versions = servermap.versions()
    recoverable = servermap.recoverable()
    unrecoverable = [version for version in versions if version not in recoverable]
    problems = []
    if unrecoverable:
        problems.append("some versions are unrecoverable")
    if not recoverable:
        problems.append("no versions are recoverable")
    if len(recoverable) > 1:
        problems.append("multiple versions are recoverable")
    counted = recoverable[0] if recoverable else (unrecoverable[0] if unrecoverable else None)
    good: dict[int, set[str]] = {}
    for ref in servermap.shares_of(counted) if counted is not None else []:
        good.setdefault(ref.shnum, set()).add(ref.server)
    needed, expected = (counted.needed, counted.total) if counted else (grid.encoding.needed, grid.encoding.total)
    if recoverable and len(good) < expected:
        problems.append(f"{len(good)} shares (enc {needed}-of-{expected})")
    corrupt = _corrupt_of(servermap.bad_shares.items())
    if corrupt:
        problems.append(" ".join(["Corrupt Shares:", *(f"{share.server_id}-sh{share.shnum}" for share in corrupt)]))
    sharemap: dict[str, set[str]] = {}
    for version, refs in versions.items():
        for ref in refs:
            sharemap.setdefault(f"{_version_name(version)}-sh{ref.shnum}", set()).add(ref.server)
    healthy = not unrecoverable and len(recoverable) == 1 and len(good) >= expected
    return CheckResult(
        storage_index=storage_index,
        summary="Healthy" if healthy else "Unhealthy: " + " ".join(problems),
        healthy=healthy,
        recoverable=bool(recoverable),
        needed=needed,
        expected=expected,
        good_shares={shnum: frozenset(servers) for shnum, servers in sorted(good.items())},
        corrupt_shares=corrupt,
        servers_responding=frozenset(servermap.servers_seen),
        sharemap={share_id: frozenset(servers) for share_id, servers in sorted(sharemap.items())},
        wrong_shares=sum(len(refs) for version, refs in versions.items() if version != counted),
        recoverable_versions=len(recoverable),
        unrecoverable_versions=len(unrecoverable),
    )
