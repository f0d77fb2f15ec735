"""When one root's leases are renewed, and how far a cycle got: a small state machine, saved so a restart resumes it.

    Idle(due)                          no cycle has run: the first starts at `due`
    Running(position, tally, last)     a cycle under way: the path of the last object done, what it found so far
    Done(result)                       the last cycle finished: the next starts one interval after it did

Sans-IO: times are the caller's wall-clock readings (seconds since the epoch, as saved across restarts), and the
walk, the renewals and the state file are the caller's (lease_renewal.py). The walk yields objects depth first in
sorted name order, so within a cycle paths only grow: a resumed cycle passes over every object at or before its
position, and a directory that could not be listed is noted once however often it is met.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

Path = tuple[str, ...]
"""Names from the root down to an object; () is the root."""

FIRST_CYCLE_DELAY = 600.0
"""Seconds from a root's first mount to its first cycle (or one interval, if shorter): a mount starts unhurried,
and a short-lived one leaves the first cycle due at the next mount."""

FORMAT = 1  # the saved state's version


FAILED_PATHS_KEPT = 20
"""Paths of failed repairs a cycle's result names (it counts them all)."""


@dataclass(frozen=True)
class Tally:
    """What a cycle found: objects whose leases every answering server renewed, objects some server failed to
    renew, objects with nothing stored to renew (literal ones), the servers (by nickname) that failed, and the
    directories that could not be listed (their children went unrenewed). With background repair: objects found
    unhealthy and repaired, and those whose repair failed (by path; they are tried again next cycle, not sooner).
    """

    renewed: int = 0
    errors: int = 0
    skipped: int = 0
    failed_servers: frozenset[str] = frozenset()
    unlisted: tuple[Path, ...] = ()
    repaired: int = 0
    repair_failures: int = 0
    repair_failed: tuple[Path, ...] = ()
    """The first FAILED_PATHS_KEPT of them: a grid too small to be happy fails every repair, and the state is
    saved after every object."""

    @property
    def objects(self) -> int:
        return self.renewed + self.errors + self.skipped


@dataclass(frozen=True)
class CycleResult:
    started_at: float
    finished_at: float
    tally: Tally


@dataclass(frozen=True)
class Idle:
    due: float


@dataclass(frozen=True)
class Running:
    started_at: float
    position: Path | None  # the last object done; None: none yet
    tally: Tally
    last: CycleResult | None  # the cycle before, still what status shows as the last finished one


@dataclass(frozen=True)
class Done:
    result: CycleResult


Schedule = Idle | Running | Done


def first_schedule(now: float, interval: float) -> Idle:
    return Idle(now + min(interval, FIRST_CYCLE_DELAY))


def due_at(schedule: Schedule, interval: float) -> float | None:
    """When the next cycle starts (None: one is under way, to go on now)."""
    if isinstance(schedule, Idle):
        return schedule.due
    if isinstance(schedule, Done):
        return schedule.result.finished_at + interval
    return None


def start(schedule: Schedule, now: float) -> Running:
    """A cycle begins (or goes on, if one was under way)."""
    if isinstance(schedule, Running):
        return schedule
    return Running(now, None, Tally(), schedule.result if isinstance(schedule, Done) else None)


def is_done(running: Running, path: Path) -> bool:
    """Whether the object at `path` was done earlier in this cycle (before a restart)."""
    return running.position is not None and path <= running.position


def renewed(running: Running, path: Path, failed_servers: Iterable[str], repaired: bool | None = None) -> Running:
    """The object at `path` was renewed on every server but `failed_servers`; and, when `repaired` is not None,
    found unhealthy and repaired (True) or not (False)."""
    failed = frozenset(failed_servers)
    tally = running.tally
    if failed:
        tally = replace(tally, errors=tally.errors + 1, failed_servers=tally.failed_servers | failed)
    else:
        tally = replace(tally, renewed=tally.renewed + 1)
    if repaired:
        tally = replace(tally, repaired=tally.repaired + 1)
    elif repaired is not None:
        kept = tally.repair_failed if len(tally.repair_failed) >= FAILED_PATHS_KEPT else (*tally.repair_failed, path)
        tally = replace(tally, repair_failures=tally.repair_failures + 1, repair_failed=kept)  # still sorted
    return replace(running, position=path, tally=tally)


def skipped(running: Running, path: Path) -> Running:
    """The object at `path` stores nothing to renew."""
    return replace(running, position=path, tally=replace(running.tally, skipped=running.tally.skipped + 1))


def unlisted(running: Running, path: Path) -> Running:
    """The directory at `path` could not be listed."""
    if path in running.tally.unlisted:
        return running
    return replace(running, tally=replace(running.tally, unlisted=tuple(sorted((*running.tally.unlisted, path)))))


def finish(running: Running, now: float) -> Done:
    return Done(CycleResult(running.started_at, now, running.tally))


def last_result(schedule: Schedule) -> CycleResult | None:
    if isinstance(schedule, Done):
        return schedule.result
    return schedule.last if isinstance(schedule, Running) else None


# --- saved form ------------------------------------------------------------------------------------------------
def to_json(schedule: Schedule) -> dict[str, Any]:
    if isinstance(schedule, Idle):
        return {"format": FORMAT, "state": "idle", "due": schedule.due}
    if isinstance(schedule, Done):
        return {"format": FORMAT, "state": "done", "result": _result_json(schedule.result)}
    return {
        "format": FORMAT,
        "state": "running",
        "started_at": schedule.started_at,
        "position": None if schedule.position is None else list(schedule.position),
        "tally": tally_json(schedule.tally),
        "last": None if schedule.last is None else _result_json(schedule.last),
    }


def from_json(saved: Any) -> Schedule | None:
    """The schedule saved by `to_json`; None when `saved` is not one (damaged, or of another format)."""
    try:
        if saved["format"] != FORMAT:
            return None
        state = saved["state"]
        if state == "idle":
            return Idle(_number(saved["due"]))
        if state == "done":
            return Done(_result(saved["result"]))
        if state == "running":
            position = None if saved["position"] is None else _path(saved["position"])
            last = None if saved["last"] is None else _result(saved["last"])
            return Running(_number(saved["started_at"]), position, _tally(saved["tally"]), last)
    except (KeyError, TypeError, ValueError):
        pass
    return None


def tally_json(tally: Tally) -> dict[str, Any]:
    """A tally as JSON: also what status shows (directories as "/a/b" there: see `show_path`)."""
    return {
        "renewed": tally.renewed,
        "errors": tally.errors,
        "skipped": tally.skipped,
        "failed_servers": sorted(tally.failed_servers),
        "unlisted": [list(path) for path in tally.unlisted],
        "repaired": tally.repaired,
        "repair_failures": tally.repair_failures,
        "repair_failed": [list(path) for path in tally.repair_failed],
    }


def show_path(path: Path) -> str:
    return "/" + "/".join(path)


def _result_json(result: CycleResult) -> dict[str, Any]:
    return {"started_at": result.started_at, "finished_at": result.finished_at, "tally": tally_json(result.tally)}


def _result(saved: Any) -> CycleResult:
    return CycleResult(_number(saved["started_at"]), _number(saved["finished_at"]), _tally(saved["tally"]))


def _tally(saved: Any) -> Tally:
    servers = saved["failed_servers"]
    if not isinstance(servers, list) or not all(isinstance(server, str) for server in servers):
        raise ValueError("failed servers are not names")
    unlisted_paths = tuple(sorted({_path(path) for path in saved["unlisted"]}))
    # Saved before background repair existed: no repair counts, none done.
    repair_failed = tuple(sorted({_path(path) for path in saved.get("repair_failed", [])}))[:FAILED_PATHS_KEPT]
    return Tally(
        _count(saved["renewed"]),
        _count(saved["errors"]),
        _count(saved["skipped"]),
        frozenset(servers),
        unlisted_paths,
        _count(saved.get("repaired", 0)),
        _count(saved.get("repair_failures", len(repair_failed))),
        repair_failed,
    )


def _count(saved: Any) -> int:
    if isinstance(saved, bool) or not isinstance(saved, int) or saved < 0:
        raise ValueError("a count is not a number")
    return saved


def _path(saved: Any) -> Path:
    if not isinstance(saved, list) or not all(isinstance(name, str) for name in saved):
        raise ValueError("a path is not a list of names")
    return tuple(saved)


def _number(saved: Any) -> float:
    if isinstance(saved, bool) or not isinstance(saved, int | float):
        raise ValueError("a time is not a number")
    return float(saved)
