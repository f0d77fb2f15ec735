"""Repair: give every share of a file a home again, on servers enough for servers-of-happiness.

CHK files are repaired as Tahoe's repairer does (`immutable/repairer.py`): download the file (every block checked)
and upload it again with its own key, k, N and segment size. That encoding is deterministic, so the regenerated
shares are byte-identical to the lost ones; the placement keeps the good shares where they are and writes only
the missing share numbers. The plaintext passes through a temporary file, so memory stays at a few segments.

Mutable files and directories are repaired as Tahoe's are (`mutable/repairer.py`): read the best recoverable
version and publish it again with a higher sequence number, which rewrites every share where a copy was seen and
places the rest along the ring. As in Tahoe, repair refuses to run when that would lose data: when a newer version
exists that cannot be recovered, or when several recoverable versions share the highest sequence number (a merge
the application has to make); `force=True` overrides both, keeping the best recoverable version.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .. import base32
from ..caps import Cap, ChkCap, DirectoryCap, MdmfWriteCap, MutableReadCap, MutableVerifierCap, MutableWriteCap
from ..errors import LafsError, NotEnoughSharesError, sole_exception
from ..immutable.encode import ChkEncoder
from ..immutable.params import ChkParameters
from ..mutable.keys import MDMF, SDMF
from ..mutable.retrieve import AnyMutableCap, ServerMap, UnrecoverableFileError
from .checker import CheckResult, check
from .download import ImmutableFile
from .grid import Grid
from .mutable_io import map_servers, publish_version, read_version, writer_keys
from .selection import by_server, happiness
from .upload import PlacementGoal, file_chunks, upload_encoded

log = logging.getLogger("blackmatch.repair")


class RepairRequiresWriteCapError(LafsError):
    """Only a write cap can republish a mutable file: the write enabler and the signing key come from it."""


@dataclass(frozen=True)
class RepairResult:
    """What one repair did. `successful` means every share number has a home and servers-of-happiness holds."""

    attempted: bool
    """False when the file needed nothing: it was healthy (a repair run twice does nothing the second time)."""
    successful: bool
    placed: Mapping[int, frozenset[str]] = field(default_factory=dict)
    """Share number -> servers this repair wrote it to (a republished mutable file: every share it wrote)."""
    happiness_before: int = 0
    happiness_after: int = 0
    reason: str = ""
    """Why the repair did not succeed, in one line; empty when it did."""
    size: int = 0
    """Bytes of the file the repair read to encode again (0 when it stopped before reading): its cost to the
    network, which background repair paces itself by."""


def shares_of(holdings: Mapping[str, set[int]]) -> dict[int, frozenset[str]]:
    """Share number -> server ids, from server id -> share numbers."""
    shares: dict[int, set[str]] = {}
    for server_id, shnums in holdings.items():
        for shnum in shnums:
            shares.setdefault(shnum, set()).add(server_id)
    return {shnum: frozenset(servers) for shnum, servers in sorted(shares.items())}


def _shortfall(holdings: Mapping[str, set[int]], total: int, happy: int) -> str:
    """Why these holdings are not healthy, or "" if they are: every share number placed, happiness met."""
    present = {shnum for shnums in holdings.values() for shnum in shnums}
    achieved = happiness(holdings)
    missing = total - len(present & set(range(total)))
    if missing:
        return f"{missing} of {total} shares have no server; happiness {achieved} (need {happy})"
    if achieved < happy:
        return f"happiness {achieved}, need {happy}: too few servers hold distinct shares"
    return ""


def _failed(name: str, before: int, raised: BaseException, size: int) -> RepairResult:
    """The result of a repair that a LafsError or a local disk's error stopped (raised again if it was anything
    else)."""
    failure = sole_exception(raised)
    if isinstance(failure, OSError):
        where = f" ({failure.filename})" if failure.filename else ""
        failure = LafsError(f"cannot keep the file's contents while it is repaired{where}: {failure.strerror}")
    if not isinstance(failure, LafsError):
        raise raised
    reason = " ".join(str(failure).split())
    if isinstance(failure, NotEnoughSharesError | UnrecoverableFileError):
        reason = f"unrecoverable: {reason}"
    log.warning("repair of %s failed: %s", name, reason)
    return RepairResult(True, False, happiness_before=before, happiness_after=before, reason=reason, size=size)


async def repair_immutable(
    grid: Grid,
    cap: ChkCap,
    good_shares: Mapping[int, frozenset[str]],
    *,
    scratch_dir: Path | None = None,
) -> RepairResult:
    """Regenerate the share numbers missing from `good_shares` and place them until happiness holds.

    `good_shares` maps share number -> servers holding a good (verified, or at least present) copy; corrupt
    copies are absent from it, and a server's claim to hold a share outside it is not believed. The plaintext
    is staged in a temporary file under `scratch_dir` (made if missing; the system's temporary directory by
    default): plaintext, so callers give a private directory.
    """
    good_shares = {shnum: servers for shnum, servers in good_shares.items() if servers and 0 <= shnum < cap.total}
    happy = min(grid.encoding.happy, cap.total)
    before = happiness(by_server(good_shares))
    name = base32.encode(cap.storage_index)[:8]
    if len(good_shares) < cap.needed:
        return RepairResult(
            True,
            False,
            happiness_before=before,
            happiness_after=before,
            reason=f"unrecoverable: {len(good_shares)} good shares, {cap.needed} needed",
        )
    if not _shortfall(by_server(good_shares), cap.total, happy):
        return RepairResult(False, True, happiness_before=before, happiness_after=before)
    log.info("repairing %s: %d of %d shares, happiness %d", name, len(good_shares), cap.total, before)
    goal = PlacementGoal(cap.total, happy, required=0, known=good_shares)
    try:
        if scratch_dir is not None:
            scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="blackmatch-repair-", dir=scratch_dir) as scratch:
            staged = Path(scratch) / "plaintext"
            source = ImmutableFile(grid, cap, good_shares)
            params = ChkParameters(cap.needed, cap.total, await source.segment_size(), cap.size)
            async with await trio.open_file(staged, "wb") as out:
                await source.copy_to(out.write)
            encoder = ChkEncoder(cap.key, params, expected=cap)
            uploaded = await upload_encoded(grid, encoder, file_chunks(staged), goal)
    except (LafsError, OSError, BaseExceptionGroup) as raised:
        return _failed(name, before, raised, cap.size)
    after = happiness(uploaded.holdings)
    shortfall = _shortfall(uploaded.holdings, cap.total, happy)
    placed = {shnum: frozenset({server_id}) for shnum, server_id in sorted(uploaded.written.items())}
    log.info("repaired %s: %d shares placed, happiness %d -> %d", name, len(placed), before, after)
    return RepairResult(True, not shortfall, placed, before, after, shortfall, cap.size)


def _version_holdings(servermap: ServerMap) -> dict[str, set[int]]:
    """Server id -> share numbers of the best recoverable version."""
    best = servermap.best_version()
    holdings: dict[str, set[int]] = {}
    for ref in servermap.shares_of(best) if best else []:
        holdings.setdefault(ref.server, set()).add(ref.shnum)
    return holdings


def _mutable_problems(servermap: ServerMap, happy: int) -> str:
    """Why a mutable file needs repair, or "" if it does not: as Tahoe's checker decides (one recoverable
    version, no other version, all N shares), plus no share failing its signature and happiness met."""
    best = servermap.best_version()
    assert best is not None, "an unrecoverable file is not repaired"
    if len(servermap.versions()) > 1:
        return f"{len(servermap.versions())} versions on the grid"
    if servermap.bad_shares:
        return f"{len(servermap.bad_shares)} shares are corrupt"
    return _shortfall(_version_holdings(servermap), best.total, min(happy, best.total))


def _refusal(servermap: ServerMap) -> str:
    """Tahoe's reasons to refuse a repair that would lose data, or "" if there is none."""
    recoverable = servermap.recoverable()
    if not recoverable:
        return ""
    best_seqnum = recoverable[0].seqnum
    if any(version.seqnum > best_seqnum for version in servermap.versions() if version not in recoverable):
        return "a newer version exists but cannot be recovered; repairing would discard it"
    seqnums = [version.seqnum for version in recoverable]
    if len(seqnums) != len(set(seqnums)):
        return "several recoverable versions have the same sequence number; they need merging, not repair"
    return ""


async def repair_mutable(grid: Grid, cap: AnyMutableCap | DirectoryCap, *, force: bool = False) -> RepairResult:
    """Republish the best recoverable version of a mutable file or directory so every share has a home.

    A healthy file is left alone. RepairRequiresWriteCapError for a read-only or verify cap: the write enabler
    every server checks, and the key that signs the new version, come from the write cap.
    """
    file_cap = cap.file_cap if isinstance(cap, DirectoryCap) else cap
    if isinstance(file_cap, MutableReadCap | MutableVerifierCap):
        raise RepairRequiresWriteCapError("repair needs the write cap of a mutable file or directory, not a read cap")
    if not isinstance(file_cap, MutableWriteCap):
        raise TypeError("an immutable directory is repaired as the CHK file that holds it (repair_immutable)")
    name = base32.encode(file_cap.storage_index)[:8]
    servermap = await map_servers(grid, file_cap)
    before = happiness(_version_holdings(servermap))
    if servermap.best_version() is None:
        good = len({ref.shnum for ref in servermap.headers})
        reason = f"unrecoverable: no version of the file has enough shares ({good} good shares found)"
        return RepairResult(True, False, happiness_before=before, happiness_after=before, reason=reason)
    problem = _mutable_problems(servermap, grid.encoding.happy)
    if not problem:
        return RepairResult(False, True, happiness_before=before, happiness_after=before)
    log.info("repairing %s: %s", name, problem)
    refusal = _refusal(servermap)
    if refusal and not force:
        return RepairResult(True, False, happiness_before=before, happiness_after=before, reason=refusal)
    version = servermap.best_version()
    assert version is not None, "an unrecoverable file was returned above"
    plaintext = b""
    try:
        # The best version or nothing: falling back to an older one when the best fails to read would republish
        # the older one over it (Tahoe's repairer fails then too).
        plaintext = await read_version(grid, file_cap, servermap, version)
        keys = await writer_keys(grid, file_cap, servermap)
        file_format = MDMF if isinstance(file_cap, MdmfWriteCap) else SDMF
        published = await publish_version(grid, keys, plaintext, servermap, file_format, version.needed, version.total)
    except (LafsError, BaseExceptionGroup) as raised:
        return _failed(name, before, raised, len(plaintext))
    after = happiness(published.written)
    shortfall = _shortfall(published.written, version.total, min(grid.encoding.happy, version.total))
    log.info("repaired %s: republished as version %d, happiness %d -> %d", name, published.prefix.seqnum, before, after)
    return RepairResult(True, not shortfall, shares_of(published.written), before, after, shortfall, len(plaintext))


@dataclass(frozen=True)
class CheckAndRepairResult:
    """A check, the repair it called for (None when the object was healthy), and the check after it."""

    pre: CheckResult
    repair: RepairResult | None
    post: CheckResult


async def check_and_repair(
    grid: Grid, cap: Cap, *, verify: bool = False, add_lease: bool = False, scratch_dir: Path | None = None
) -> CheckAndRepairResult:
    """Tahoe's check-and-repair of one object: check it, repair it if it is not healthy, and check it again.

    The check after a repair lists shares without verifying them: a corrupt share the first check found is still
    on its server (the storage protocol cannot delete it) and would be verified, and advised, a second time.
    """
    pre = await check(grid, cap, verify=verify, add_lease=add_lease)
    if pre.healthy:
        return CheckAndRepairResult(pre, None, pre)
    repair = await _repair(grid, cap, pre, scratch_dir)
    post = await check(grid, cap) if repair.attempted else pre
    return CheckAndRepairResult(pre, repair, post)


async def _repair(grid: Grid, cap: Cap, pre: CheckResult, scratch_dir: Path | None) -> RepairResult:
    """Repair one object that `pre` found unhealthy, by its kind; a cap that cannot repair it says why."""
    inner = cap.file_cap if isinstance(cap, DirectoryCap) else cap
    if isinstance(inner, ChkCap):
        return await repair_immutable(grid, inner, pre.good_shares, scratch_dir=scratch_dir)
    if isinstance(inner, MutableWriteCap):
        return await repair_mutable(grid, cap if isinstance(cap, DirectoryCap) else inner)
    happy = pre.happiness
    reason = "repair needs a read cap (a verify cap cannot rebuild shares)"
    if isinstance(inner, MutableReadCap | MutableVerifierCap):
        reason = "repair of a mutable file or directory needs its write cap"
    return RepairResult(True, False, happiness_before=happy, happiness_after=happy, reason=reason)
