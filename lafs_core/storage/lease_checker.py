"""The lease checker: a crawler inside `storage run` that passes over every share and deletes expired ones.

Tahoe's LeaseCheckingCrawler (`storage/crawler.py`, `expirer.py`), over Tahoe's share layout: buckets are
visited in order of storage index (prefix directories sorted, buckets sorted within them), each in one brief
store call that takes its turn with the GBS requests, so a lease renewed by a client is either seen or comes
after the share is gone, never lost in between. `shares/incoming/` (uploads in progress) is never visited.

The rate is bounded as Tahoe bounds it: work for at most `slice_seconds`, then pause long enough that the
checker is busy for `busy_fraction` of the time at most; between passes it waits `ExpirySettings.cycle_time`,
and the first pass waits `slow_start` (or one cycle time, if shorter) after start-up. With expiry disabled the
checker still passes over the shares and reports what it would delete, as Tahoe's does.

Its state (`DIR/lease-checker.json`) holds the last bucket done in the current pass, the counts of the pass
so far and those of the last finished pass; it is replaced atomically after every slice, so a killed server
resumes its pass where the last slice ended (looking at a bucket twice is harmless). The last pass's counts are
there for a `status` command to report.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from .. import base32
from .expiry import ExpirySettings, share_expired
from .journal import fsync_directory
from .share_store import ShareStore

log = logging.getLogger("blackmatch.storage.lease_checker")

T = TypeVar("T")
STATE_VERSION = 1
_BUCKET_NAME_LENGTH = base32.encoded_length(16)
_ALPHABET = frozenset(base32.ALPHABET)


class StoreAccess(Protocol):
    """Runs a function on the share store in its turn with everything else that uses the store."""

    async def __call__(self, fn: Callable[[ShareStore], T]) -> T: ...


@dataclass(frozen=True)
class Pacing:
    """How hard the checker works; the defaults are Tahoe's."""

    slice_seconds: float = 1.0  # work at most this long before pausing
    busy_fraction: float = 0.10  # pause so that work takes at most this share of the time
    longest_pause: float = 299.0  # within a pass
    slow_start: float = 360.0  # before the first pass after start-up


@dataclass
class PassCounts:
    """What one pass over the shares found and did."""

    buckets: int = 0
    shares: int = 0
    expired: int = 0  # shares whose leases have all expired under the settings
    deleted: int = 0  # expired shares deleted (none while expiry is disabled)
    reclaimed_bytes: int = 0
    unreadable: int = 0  # shares whose container does not parse: kept

    def add(self, other: PassCounts) -> None:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class CheckerState:
    """The checker's progress, as saved in `lease-checker.json`."""

    current_pass: int | None = None  # None between passes
    passes_finished: int = 0
    position: str | None = None  # base32 storage index of the last bucket done in the current pass
    pass_started: float | None = None  # seconds since the epoch
    resumed: bool = False  # the current pass went on after a restart
    so_far: PassCounts = field(default_factory=PassCounts)
    last_pass: dict[str, Any] | None = None  # counts, pass number, started, finished, resumed

    def to_json(self) -> bytes:
        return json.dumps({"version": STATE_VERSION, **asdict(self)}, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> CheckerState:
        """The state in `data`; ValueError if it is not a state this version wrote."""
        try:
            raw = json.loads(data)
            if raw.pop("version") != STATE_VERSION:
                raise ValueError("unknown version")
            raw["so_far"] = PassCounts(**raw["so_far"])
            state = cls(**raw)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a lease checker state: {exc}") from None
        if state.position is not None and not isinstance(state.position, str):
            raise ValueError("not a lease checker state: bad position")
        return state


def load_state(path: Path) -> CheckerState:
    """The saved state, or a fresh one when there is none or it cannot be read (the pass starts over)."""
    try:
        return CheckerState.from_json(path.read_bytes())
    except FileNotFoundError:
        return CheckerState()
    except (OSError, ValueError) as exc:
        log.warning("lease checker: starting afresh, cannot read %s: %s", path, exc)
        return CheckerState()


def save_state(path: Path, state: CheckerState) -> None:
    """Replace the state file whole: a kill leaves the old one or the new one."""
    temporary = path.with_name(path.name + ".new")
    with open(temporary, "wb") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def _sorted_names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:  # unreadable: its shares are kept, as a share that cannot be read is
        log.warning("lease checker: cannot list %s: %s", directory, exc.strerror)
        return []


def buckets_after(shares_dir: Path, position: str | None) -> Iterator[str]:
    """Bucket names (base32 storage indexes) under `shares_dir`, in order, after `position`."""
    for prefix in _sorted_names(shares_dir):
        # Only two-letter prefix directories hold buckets: this leaves out `incoming/`.
        if len(prefix) != 2 or not set(prefix) <= _ALPHABET or (position and prefix < position[:2]):
            continue
        for name in _sorted_names(shares_dir / prefix):
            if len(name) != _BUCKET_NAME_LENGTH or not name.startswith(prefix) or not base32.is_canonical(name):
                continue
            if position is None or name > position:
                yield name


class LeaseChecker:
    """Passes over the shares of one store forever (until cancelled), expiring shares as `settings` say."""

    def __init__(
        self,
        access: StoreAccess,
        shares_dir: Path,
        state_path: Path,
        settings: ExpirySettings,
        *,
        pacing: Pacing | None = None,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self._access = access
        self._shares_dir = shares_dir
        self._state_path = state_path
        self.settings = settings
        self.pacing = pacing or Pacing()
        self._sleep = sleep
        self.state = load_state(state_path)
        self._save_error: str | None = None
        if self.state.current_pass is not None:  # a server stopped or killed during a pass
            self.state.resumed = True

    async def run(self) -> None:
        await self._sleep(min(self.pacing.slow_start, self.settings.cycle_time))
        while True:
            started = trio.current_time()
            finished = await self.run_slice()
            busy = trio.current_time() - started
            pause = max(0.0, min(busy / self.pacing.busy_fraction - busy, self.pacing.longest_pause))
            await self._sleep(max(pause, self.settings.cycle_time) if finished else pause)

    async def run_slice(self) -> bool:
        """Look at buckets for one slice of time and save the state; True if that finished the pass."""
        state = self.state
        if state.current_pass is None:
            state.current_pass = state.passes_finished
            state.pass_started = time.time()
            state.position, state.resumed, state.so_far = None, False, PassCounts()
        deadline = trio.current_time() + self.pacing.slice_seconds
        for name in buckets_after(self._shares_dir, state.position):
            storage_index = base32.decode(name)
            state.so_far.add(await self._access(functools.partial(self._check_bucket, storage_index=storage_index)))
            state.position = name
            if trio.current_time() >= deadline:
                self._save()
                return False
        self._finish_pass()
        return True

    def _save(self) -> None:
        """Save the state; when the disk refuses (full, failing), go on from the state in memory, and say so once
        per kind of error: the server must keep serving then, and a restart only repeats some of the pass."""
        try:
            save_state(self._state_path, self.state)
        except OSError as exc:
            if exc.strerror != self._save_error:
                log.warning("lease checker: cannot save its place in %s: %s", self._state_path, exc.strerror)
            self._save_error = exc.strerror
        else:
            self._save_error = None

    def _finish_pass(self) -> None:
        """Keep the pass's counts as the last pass's, save them, then log them (so the log never runs ahead of
        the state file)."""
        state = self.state
        counts = state.so_far
        state.last_pass = {
            "pass": state.current_pass,
            "started": state.pass_started,
            "finished": time.time(),
            "resumed": state.resumed,
            **asdict(counts),
        }
        state.passes_finished += 1
        state.current_pass, state.position, state.pass_started, state.resumed = None, None, None, False
        state.so_far = PassCounts()
        self._save()
        log.info(
            "lease checker: pass %d finished%s: %d shares in %d buckets examined, %d expired, %d deleted, "
            "%d bytes reclaimed, %d unreadable (%s)",
            state.last_pass["pass"],
            " (resumed after a restart)" if state.last_pass["resumed"] else "",
            counts.shares,
            counts.buckets,
            counts.expired,
            counts.deleted,
            counts.reclaimed_bytes,
            counts.unreadable,
            self.settings.describe(),
        )

    def _check_bucket(self, store: ShareStore, storage_index: bytes) -> PassCounts:
        """One bucket, inside one store call: nothing else changes its shares meanwhile."""
        counts = PassCounts(buckets=1)
        now = time.time()
        try:
            shares = store.stored_shares(storage_index)
            if not shares and self.settings.enabled:
                store.remove_bucket_if_empty(storage_index)  # left by a kill between a deletion and its rmdir
            for share in shares:
                counts.shares += 1
                if share.lease_expirations is None:
                    counts.unreadable += 1
                    log.warning(
                        "lease checker: kept share %d of %s: its container does not parse",
                        share.shnum,
                        base32.encode(storage_index),
                    )
                    continue
                if not share_expired(share.mutable, share.lease_expirations, self.settings, now):
                    continue
                counts.expired += 1
                if self.settings.enabled:
                    store.delete_share(storage_index, share.shnum)
                    counts.deleted += 1
                    counts.reclaimed_bytes += share.size
        except OSError as exc:
            log.warning("lease checker: skipped bucket %s: %s", base32.encode(storage_index), exc.strerror or exc)
        return counts
