"""`blackmatch check` and `blackmatch deep-check`, as Tahoe's `tahoe check` and `tahoe deep-check -v` report.

TARGET is `alias:path`, a cap (`CAP/path` too), or a path on a blackmatch mount (its `user.tahoe.readcap`; with
`--repair`, its `user.tahoe.cap` where the mount has one, as a mutable object's repair needs the write cap).
Text output follows Tahoe's CLI; `--json` follows Tahoe's web JSON (`t=check&output=JSON` for check, the lines of
`t=stream-deep-check` for deep-check; with `--repair`, Tahoe's check-and-repair results). Only read caps and verify
caps are ever printed, never a write cap.

Exit status, unlike Tahoe's (which exits 0 whatever it finds), tells scripts the verdict (with `--repair`, the
verdict after the repair): 0 everything checked is healthy; 3 something is not healthy but everything is
recoverable; 4 something is unrecoverable (or a directory could not be listed, so what is below it went
unchecked); 1 the check itself failed (grid unreachable, bad target); 2 a usage mistake.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid_server.filesystem import CAP_XATTR, READCAP_XATTR
from grid_server.lease_renewal import REPAIR_SCRATCH
from lafs_core import base32
from lafs_core.caps import Cap, DirectoryCap, UnknownCap, parse_known_cap
from lafs_core.errors import LafsError
from lafs_core.grid.checker import CheckResult, check
from lafs_core.grid.directory import resolve
from lafs_core.grid.grid import Grid, NoServerAnsweredError
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.repair import CheckAndRepairResult, check_and_repair
from lafs_core.grid.traverse import walk

from .grid_commands import grid_handler, location_of, shown_name
from .mount_commands import is_blackmatch, mounts
from .node_options import add_node_directory_option

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNRECOVERABLE = 0, 3, 4

_EPILOG = (
    "exit status: 0 all healthy; 3 something not healthy (but recoverable); 4 something unrecoverable; "
    "1 the check failed (grid unreachable, bad target); with --repair, the state after the repair"
)


def add_maintenance_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, handler, helptext in (
        ("check", check_command, "check the shares of one file or directory"),
        ("deep-check", deep_check_command, "check everything reachable from a directory"),
    ):
        sub = commands.add_parser(name, help=helptext, description=helptext, epilog=_EPILOG)
        add_node_directory_option(sub)
        sub.add_argument(
            "--verify", action="store_true", help="read every share whole and check every block against its hashes"
        )
        sub.add_argument("--add-lease", action="store_true", help="renew this node's lease on every share found")
        sub.add_argument(
            "--repair",
            action="store_true",
            help="regenerate and place missing shares of what is not healthy (mutable: needs the write cap)",
        )
        sub.add_argument("--json", action="store_true", help="JSON in the shape of Tahoe's check results")
        sub.add_argument("target", metavar="TARGET", help="alias:path, a cap, or a path on a blackmatch mount")
        sub.set_defaults(handler=grid_handler(handler))


# --- what to check -----------------------------------------------------------------------------------------------
async def target_cap(grid: Grid, node: NodeDirectory, text: str, *, writable: bool = False) -> Cap:
    """The object TARGET names: a local path (on a blackmatch mount) by its cap, else a grid location."""
    if _local_path(text):
        return mounted_cap(text, writable)
    root, components = location_of(text, node)
    cap, _entry = await resolve(grid, root, components)
    return cap


def _local_path(text: str) -> bool:
    """Whether TARGET is a local path: it is written as one, or exists here. Otherwise it is a grid location, a
    bare name being a path in the default alias as in Tahoe."""
    return text.startswith(("/", "./", "../")) or os.path.lexists(text)


def mounted_cap(text: str, writable: bool) -> Cap:
    """The cap of a path on a blackmatch mount: its read cap, or its write cap when `writable` and the mount has
    one (a mutable object's repair needs it)."""
    if not os.path.lexists(text):
        raise LafsError(f"{text}: no such file or directory")
    if not _on_blackmatch_mount(Path(text)):
        raise LafsError(f"{text} is not on a blackmatch mount: name it as alias:path or by its cap")
    for attribute in (CAP_XATTR, READCAP_XATTR) if writable else (READCAP_XATTR,):
        try:
            value = os.getxattr(text, attribute, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise LafsError(f"{text}: cannot read its cap: {exc.strerror}") from None
        return parse_known_cap(value.decode("ascii"))
    raise LafsError(f"{text} is not on the grid yet: check it once its upload is done")


def _on_blackmatch_mount(path: Path) -> bool:
    """Whether the innermost mount holding `path` is a blackmatch mount."""
    where = os.path.realpath(path)
    holding = [m for m in mounts() if where == m.mountpoint or where.startswith(m.mountpoint.rstrip("/") + "/")]
    return bool(holding) and is_blackmatch(max(holding, key=lambda m: len(m.mountpoint)))


# --- what a check says -------------------------------------------------------------------------------------------
def _si(result: CheckResult) -> str:
    return base32.encode(result.storage_index) if result.storage_index is not None else ""


def _corrupt_line(result: CheckResult, server_id: str, shnum: int) -> str:
    return f"server {server_id}, SI {_si(result)}, shnum {shnum}"


def check_text(result: CheckResult) -> list[str]:
    """`tahoe check`'s lines, then the good share hosts and happiness Tahoe shows only on its web page."""
    lines = [f"Summary: {result.summary}", f" storage index: {_si(result)}"]
    if result.storage_index is None:
        return lines
    lines += [
        f" good-shares: {len(result.good_shares)} (encoding is {result.needed}-of-{result.expected})",
        f" wrong-shares: {result.wrong_shares}",
        f" good-share-hosts: {result.good_share_hosts}",
        f" happiness: {result.happiness}",
    ]
    if result.corrupt_shares:
        lines.append(" corrupt shares:")
        lines += [f"  {_corrupt_line(result, share.server_id, share.shnum)}" for share in result.corrupt_shares]
    return lines


def check_json(result: CheckResult) -> dict[str, Any]:
    """The JSON Tahoe's web API gives for `t=check&output=JSON` (a LIT object: storage index "" and healthy only)."""
    if result.storage_index is None:
        return {"storage-index": "", "results": {"healthy": True}}
    si = _si(result)
    return {
        "storage-index": si,
        "summary": result.summary,
        "results": {
            "count-happiness": result.happiness,
            "count-shares-good": len(result.good_shares),
            "count-shares-needed": result.needed,
            "count-shares-expected": result.expected,
            "count-good-share-hosts": result.good_share_hosts,
            "count-corrupt-shares": len(result.corrupt_shares),
            "list-corrupt-shares": [[share.server_id, si, share.shnum] for share in result.corrupt_shares],
            "servers-responding": sorted(result.servers_responding),
            "sharemap": {share_id: sorted(servers) for share_id, servers in result.sharemap.items()},
            "count-wrong-shares": result.wrong_shares,
            "count-recoverable-versions": result.recoverable_versions,
            "count-unrecoverable-versions": result.unrecoverable_versions,
            "healthy": result.healthy,
            "recoverable": result.recoverable,
        },
    }


def repair_text(outcome: CheckAndRepairResult) -> list[str]:
    """`tahoe check --repair`'s lines: the check before, then whether the repair worked (and why not)."""
    lines = check_text(outcome.pre)
    lines[0] = f"Summary: {'healthy' if outcome.pre.healthy else 'not healthy'}"
    if outcome.repair is not None and outcome.repair.attempted:
        if outcome.repair.successful:
            lines.append(f" repair successful: {_placed(outcome)}")
        else:
            lines.append(f" repair failed: {outcome.repair.reason}")
    return lines


def _placed(outcome: CheckAndRepairResult) -> str:
    assert outcome.repair is not None
    placed = sum(len(servers) for servers in outcome.repair.placed.values())
    return f"{placed} shares placed, happiness {outcome.repair.happiness_before} -> {outcome.repair.happiness_after}"


def repair_json(outcome: CheckAndRepairResult) -> dict[str, Any]:
    """Tahoe's check-and-repair JSON (`t=check&repair=true&output=JSON`)."""
    repair = outcome.repair
    return {
        "storage-index": check_json(outcome.pre)["storage-index"],
        "repair-attempted": repair is not None and repair.attempted,
        "repair-successful": repair is not None and repair.attempted and repair.successful,
        "pre-repair-results": check_json(outcome.pre),
        "post-repair-results": check_json(outcome.post),
    }


def exit_status(result: CheckResult) -> int:
    if result.healthy:
        return EXIT_HEALTHY
    return EXIT_UNHEALTHY if result.recoverable else EXIT_UNRECOVERABLE


# --- commands ----------------------------------------------------------------------------------------------------
async def check_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    cap = await target_cap(grid, node, args.target, writable=args.repair)
    if args.repair:
        outcome = await _check_one(grid, node, cap, args)
        print(json.dumps(repair_json(outcome), indent=1) if args.json else "\n".join(repair_text(outcome)))
        return exit_status(outcome.post)
    result = await check(grid, cap, verify=args.verify, add_lease=args.add_lease)
    print(json.dumps(check_json(result), indent=1) if args.json else "\n".join(check_text(result)))
    return exit_status(result)


@dataclass
class DeepCheckTally:
    """Tahoe's deep-check counters (before and after repair), plus what blackmatch adds: unrecoverable objects
    and unlistable directories. Without `--repair` the state after is the state before."""

    repairing: bool
    checked: int = 0
    healthy: int = 0
    unrecoverable: int = 0
    corrupt_shares: int = 0
    unlisted: int = 0
    repairs_attempted: int = 0
    repairs_successful: int = 0
    healthy_after: int = 0
    unrecoverable_after: int = 0

    def add(self, outcome: CheckAndRepairResult | None) -> None:
        """Count one object (None: it could not be checked, which counts as unrecoverable)."""
        self.checked += 1
        if outcome is None:
            self.unrecoverable += 1
            self.unrecoverable_after += 1
            return
        self.healthy += outcome.pre.healthy
        self.unrecoverable += not outcome.pre.recoverable
        self.corrupt_shares += len(outcome.pre.corrupt_shares)
        self.healthy_after += outcome.post.healthy
        self.unrecoverable_after += not outcome.post.recoverable
        if outcome.repair is not None and outcome.repair.attempted:
            self.repairs_attempted += 1
            self.repairs_successful += outcome.repair.successful

    @property
    def status(self) -> int:
        if self.unrecoverable_after or self.unlisted:
            return EXIT_UNRECOVERABLE
        return EXIT_UNHEALTHY if self.healthy_after < self.checked else EXIT_HEALTHY

    def summary(self) -> list[str]:
        if self.repairing:
            failed = self.repairs_attempted - self.repairs_successful
            lines = [
                f"done: {self.checked} objects checked",
                f" pre-repair: {self.healthy} healthy, {self.checked - self.healthy} unhealthy",
                f" {self.repairs_attempted} repairs attempted, {self.repairs_successful} successful, {failed} failed",
                f" post-repair: {self.healthy_after} healthy, {self.checked - self.healthy_after} unhealthy",
                f" {self.unrecoverable_after} unrecoverable",
            ]
        else:
            unhealthy = self.checked - self.healthy
            lines = [
                f"done: {self.checked} objects checked, {self.healthy} healthy, {unhealthy} unhealthy",
                f" {self.unrecoverable} unrecoverable",
            ]
        if self.unlisted:
            lines.append(f" {self.unlisted} directories could not be listed: what is inside them was not checked")
        return lines

    def stats(self) -> dict[str, int]:
        stats = {
            "count-objects-checked": self.checked,
            "count-objects-healthy": self.healthy,
            "count-objects-unhealthy": self.checked - self.healthy,
            "count-objects-unrecoverable": self.unrecoverable,
            "count-corrupt-shares": self.corrupt_shares,
            "count-directories-unlisted": self.unlisted,
        }
        if self.repairing:
            stats |= {
                "count-repairs-attempted": self.repairs_attempted,
                "count-repairs-successful": self.repairs_successful,
                "count-repairs-unsuccessful": self.repairs_attempted - self.repairs_successful,
                "count-objects-healthy-post-repair": self.healthy_after,
                "count-objects-unhealthy-post-repair": self.checked - self.healthy_after,
                "count-objects-unrecoverable-post-repair": self.unrecoverable_after,
            }
        return stats


def _shown_path(path: tuple[str, ...]) -> str:
    return "/".join(shown_name(name) for name in path) or "<root>"


def _object_line(
    path: tuple[str, ...], cap: Cap, outcome: CheckAndRepairResult | None, error: str | None, repairing: bool
) -> dict[str, Any]:
    """One line of Tahoe's stream-deep-check, with the read cap as "cap" where Tahoe gives the write cap."""
    verifier = cap.verifier()
    line: dict[str, Any] = {
        "type": "directory" if isinstance(cap, DirectoryCap) else "file",
        "path": list(path),
        "cap": str(cap.readonly()),
        "verifycap": str(verifier) if verifier is not None else "",
        "storage-index": base32.encode(cap.storage_index) if cap.storage_index is not None else "",
    }
    if outcome is None:
        line["error"] = error
    elif repairing:
        line["check-and-repair-results"] = repair_json(outcome)
    else:
        line["check-results"] = check_json(outcome.pre)
    return line


def _object_text(path: tuple[str, ...], outcome: CheckAndRepairResult | None, error: str | None) -> list[str]:
    """An object's lines: its health (before any repair), its corrupt shares, and what a repair did."""
    if outcome is None:
        return [f"{_shown_path(path)}: ERROR: {error}"]
    result = outcome.pre
    lines = [f"{_shown_path(path)}: {result.summary}"]
    lines += [f" corrupt: {_corrupt_line(result, share.server_id, share.shnum)}" for share in result.corrupt_shares]
    if outcome.repair is not None and outcome.repair.attempted:
        repair = outcome.repair
        lines.append(
            f" repair successful: {_placed(outcome)}" if repair.successful else f" repair failed: {repair.reason}"
        )
    return lines


async def _check_one(grid: Grid, node: NodeDirectory, cap: Cap, args: argparse.Namespace) -> CheckAndRepairResult:
    if args.repair:
        scratch = node.state_dir / REPAIR_SCRATCH
        return await check_and_repair(grid, cap, verify=args.verify, add_lease=args.add_lease, scratch_dir=scratch)
    result = await check(grid, cap, verify=args.verify, add_lease=args.add_lease)
    return CheckAndRepairResult(result, None, result)


async def deep_check_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    root = await target_cap(grid, node, args.target, writable=args.repair)
    if isinstance(sys.stdout, io.TextIOWrapper):  # names print as the bytes a mount shows, UTF-8 or not
        sys.stdout.reconfigure(errors="surrogateescape")
    tally = DeepCheckTally(repairing=args.repair)

    def unlisted(path: tuple[str, ...], exc: LafsError) -> None:
        tally.unlisted += 1
        if not args.json:
            print(f"{_shown_path(path)}: its entries could not be read: {exc}", flush=True)

    async for path, cap in walk(grid, root, unlisted):
        if isinstance(cap, UnknownCap):
            continue  # a kind of object this version does not know: Tahoe's deep-check skips those too
        outcome, error = None, None
        try:
            outcome = await _check_one(grid, node, cap, args)
        except NoServerAnsweredError:
            raise
        except LafsError as exc:
            error = str(exc)
        tally.add(outcome)
        if args.json:
            print(json.dumps(_object_line(path, cap, outcome, error, args.repair)), flush=True)
        else:
            print("\n".join(_object_text(path, outcome, error)), flush=True)
    print(json.dumps({"type": "stats", "stats": tally.stats()}) if args.json else "\n".join(tally.summary()))
    return tally.status
