"""The background renewal of one mounted root's leases: every share of everything the root reaches, renewed with
the node's lease secrets once an interval (tahoe.cfg `[blackmatch] lease.renewal_interval`), one object at a time
at `lease.renewal_rate` objects a second, so a cycle over a big tree is a trickle to the servers.

The schedule (lease_schedule.py) is saved in the root's state directory after each object, so a cycle cut short
by a restart goes on from where it was, and a finished one waits out its interval across restarts. A server that
fails, or a directory that cannot be listed, goes into the cycle's result and the cycle goes on; a grid where no
server answers stops the cycle, which is tried again after a capped back-off (retries.py) shown by `status`.
Nothing here logs or saves a cap: objects are named by their path below the root.

Background health (`repair.background = true`) rides on the same walk and schedule: after renewing an object the
cycle checks it (lists its shares on every server, cheap beside the renewal) and repairs it when it is unhealthy,
as `blackmatch check --repair` would. Each repair is followed by a pause that keeps repairs, by the size of the
files they re-encode, within `repair.bandwidth` bytes a second on average. A repair that fails (a file below k
shares, a read-only cap of a mutable file) goes into the cycle's result by path and is tried again next cycle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import trio

from lafs_core.caps import Cap, DirectoryCap
from lafs_core.errors import LafsError
from lafs_core.grid.checker import renew_leases
from lafs_core.grid.grid import Grid, NoServerAnsweredError, no_server_answered
from lafs_core.grid.nodedir import LeaseRenewalConfig
from lafs_core.grid.repair import check_and_repair
from lafs_core.grid.traverse import walk

from .lease_schedule import (
    Running,
    Schedule,
    due_at,
    finish,
    first_schedule,
    from_json,
    is_done,
    last_result,
    renewed,
    show_path,
    skipped,
    start,
    tally_json,
    to_json,
    unlisted,
)
from .retries import Failures

log = logging.getLogger("blackmatch.leases")

STATE_FILE = "lease-renewal.json"
LONGEST_NAP = 3600.0
"""Seconds the task waits at most before it reads the wall clock again: the monotonic clock trio sleeps by stops
while the machine is suspended, and the due time is a wall-clock time."""
GRID = "grid"  # the one key of the back-off: the cycle as a whole
REPAIR_SCRATCH = "repair"
"""Where a background repair keeps a file's contents while it makes the file's shares again (private, on the
node's disk rather than a small RAM-backed /tmp)."""


class LeaseRenewal:
    """The renewal task of one root (`run`), and its state for `queue_state` (`state`)."""

    def __init__(self, grid: Grid, root: DirectoryCap, state_dir: Path, config: LeaseRenewalConfig) -> None:
        self.grid = grid
        self.root = root
        self.path = state_dir / STATE_FILE
        self.scratch = state_dir / REPAIR_SCRATCH
        shutil.rmtree(self.scratch, ignore_errors=True)  # what a killed repair left: plaintext, now of no use
        self.config = config
        self.failures: Failures[str] = Failures()
        interval = config.interval if config.interval is not None else math.inf
        saved = _load(self.path)
        self._first = saved is None  # the first cycle's due time is saved at once: a short mount still counts
        self.schedule: Schedule = saved or first_schedule(time.time(), interval)

    async def run(self) -> None:
        """Renew cycle after cycle while the root is open; return at once when renewal is off. A failure that is
        no grid error (a bug) ends the task, logged with its traceback and shown by `state`, never looped on."""
        interval = self.config.interval
        if interval is None:
            return
        if self._first:
            try:
                self._save(self.schedule)
            except OSError as exc:  # the first cycle is then due that long after the next start instead
                log.warning("cannot save the lease-renewal state: %s", exc)
        while True:
            due = due_at(self.schedule, interval)
            if due is not None and due > time.time():
                await trio.sleep(min(due - time.time(), LONGEST_NAP))
                continue
            try:
                await self._cycle()
            except Exception as exc:
                failure = self.failures.failed(GRID, exc, trio.current_time())
                if failure.next_try is None:
                    log.error("lease renewal stopped by an unexpected error", exc_info=exc)
                    return
                wait = failure.next_try - trio.current_time()
                log.warning("lease renewal failed (%d tries), next try in %.0f s: %s", failure.attempts, wait, exc)
                await trio.sleep_until(failure.next_try)
            else:
                self.failures.succeeded(GRID)

    async def _cycle(self) -> None:
        """One cycle from its start or its saved position to its end, saving the position after each object."""
        if not isinstance(self.schedule, Running):
            self._save(start(self.schedule, time.time()))
            log.info("lease renewal cycle starting")
        elif self.schedule.position is not None:
            log.info("lease renewal cycle resuming after %s", show_path(self.schedule.position))
        pause = 1 / self.config.rate

        def note_unlisted(path: tuple[str, ...], _why: LafsError) -> None:
            assert isinstance(self.schedule, Running)
            self.schedule = unlisted(self.schedule, path)

        async for path, cap in walk(self.grid, self.root, note_unlisted):
            running = self.schedule
            assert isinstance(running, Running)
            if is_done(running, path):  # before a restart; a directory is read again, as slowly as it was
                if isinstance(cap, DirectoryCap):
                    await trio.sleep(pause)
                continue
            storage_index = cap.storage_index
            if storage_index is None:  # a literal object: its content is its cap, nothing is stored
                self._save(skipped(running, path))
                continue
            failures = await renew_leases(self.grid, storage_index)
            if len(failures) == len(self.grid.servers):
                raise no_server_answered([str(failure) for failure in failures.values()])
            repaired = await self._check_and_repair(path, cap) if self.config.repair else None
            self._save(renewed(running, path, sorted(self.grid.server(sid).nickname for sid in failures), repaired))
            await trio.sleep(pause)
        assert isinstance(self.schedule, Running)
        done = finish(self.schedule, time.time())
        self._save(done)
        log.info("lease renewal cycle done: %s", json.dumps(_shown(tally_json(done.result.tally))))

    async def _check_and_repair(self, path: tuple[str, ...], cap: Cap) -> bool | None:
        """Check one object and repair it if it is unhealthy: None when it was healthy, else whether the repair
        made it so. After a repair, pause until its file's size at `repair.bandwidth` has passed."""
        started = trio.current_time()
        try:
            outcome = await check_and_repair(self.grid, cap, scratch_dir=self.scratch)
        except NoServerAnsweredError:
            raise
        except LafsError as exc:
            log.warning("background check of %s failed: %s", show_path(path), exc)
            return False
        except Exception:  # a bug in checking or repairing one object must not stop every lease renewal after it
            log.exception("background check of %s failed", show_path(path))
            return False
        repair = outcome.repair
        if repair is None:
            return None
        if repair.successful:
            log.info(
                "background repair of %s: happiness %d -> %d",
                show_path(path),
                repair.happiness_before,
                repair.happiness_after,
            )
        else:
            log.warning("background repair of %s failed: %s", show_path(path), repair.reason)
        await trio.sleep(repair_pause(repair.size, self.config.repair_bandwidth, trio.current_time() - started))
        return repair.successful

    def _save(self, schedule: Schedule) -> None:
        """Keep the schedule and replace the saved one whole (a crash leaves the old or the new, never a torn
        file); raises OSError, a retryable failure of the cycle."""
        self.schedule = schedule
        temporary = self.path.with_name(STATE_FILE + ".new")
        temporary.write_text(json.dumps(to_json(schedule), sort_keys=True))
        os.replace(temporary, self.path)

    def state(self) -> dict[str, Any]:
        """Where renewal stands, JSON-able, for `queue_state`: the last finished cycle's time and result, the one
        under way and its progress, when the next is due, and the last error (paths, never caps)."""
        interval = self.config.interval
        last = last_result(self.schedule)
        running = self.schedule if isinstance(self.schedule, Running) else None
        failure = self.failures.get(GRID)
        return {
            "enabled": interval is not None,
            "interval": interval,
            "repair": self.config.repair,
            "last_finished_at": None if last is None else last.finished_at,
            "last_result": None if last is None else _shown(tally_json(last.tally)),
            "running": running is not None and failure is None and interval is not None,
            "progress": None if running is None else _progress(running),
            "next_due_at": None if interval is None else due_at(self.schedule, interval),
            "error": None if failure is None else self.failures.describe(GRID, "lease renewal", trio.current_time()),
        }


def repair_pause(size: int, bandwidth: int, took: float) -> float:
    """Seconds to wait after a repair of a `size`-byte file that took `took` seconds, so that repairs average at
    most `bandwidth` bytes a second."""
    return max(0.0, size / bandwidth - took)


def _shown(tally: dict[str, Any]) -> dict[str, Any]:
    return {
        **tally,
        "unlisted": [show_path(tuple(path)) for path in tally["unlisted"]],
        "repair_failed": [show_path(tuple(path)) for path in tally["repair_failed"]],
    }


def _progress(running: Running) -> dict[str, Any]:
    """How far the cycle under way got: objects done, and the path of the last one."""
    position = None if running.position is None else show_path(running.position)
    return {"objects": running.tally.objects, "position": position, "started_at": running.started_at}


def _load(path: Path) -> Schedule | None:
    """The schedule saved at `path`; None when there is none, or it is damaged (then it starts afresh)."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("the saved lease-renewal state is unreadable (%s); starting afresh", exc)
        return None
    schedule = from_json(saved)
    if schedule is None:
        log.warning("the saved lease-renewal state is damaged; starting afresh")
    return schedule
