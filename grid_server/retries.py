"""Failing uploads and publishes as state: how often each failed, why, and when it is tried next.

Sans-IO: times are the caller's clock readings (trio.current_time()), so the back-off is tested without waiting.
An error that means "try again" (the grid, the network or a storage server failed: lafs_core's errors, OSError)
backs off from FIRST_DELAY, doubling up to MAX_DELAY, so a grid that is down for a day costs a try every five
minutes, not every two seconds. Any other error is a bug: the item is marked failed and left alone (its change stays
in the journal for the next start), shown by `queue_state` instead of retried in a loop.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lafs_core.errors import LafsError

FIRST_DELAY = 2.0  # seconds before the first retry
MAX_DELAY = 300.0  # the longest wait between two tries

RETRYABLE: tuple[type[BaseException], ...] = (LafsError, OSError)

Key = TypeVar("Key", bound=Hashable)


@dataclass
class Failure:
    error: str
    attempts: int
    next_try: float | None  # clock reading (infinity: being tried now); None: not to be retried (a bug)


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE)


class Failures(Generic[Key]):
    """The items of one kind (uploads by local file, publishes by directory) whose last try failed."""

    def __init__(self, first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY) -> None:
        self.first_delay, self.max_delay = first_delay, max_delay
        self._failures: dict[Key, Failure] = {}

    def failed(self, key: Key, exc: BaseException, now: float) -> Failure:
        """Count a failed try; the failure says when to try again (None: never, the error is a bug)."""
        previous = self._failures.get(key)
        attempts = 1 if previous is None else previous.attempts + 1
        delay = min(self.max_delay, self.first_delay * 2 ** min(attempts - 1, 32))
        failure = Failure(str(exc) or type(exc).__name__, attempts, now + delay if retryable(exc) else None)
        self._failures[key] = failure
        return failure

    def succeeded(self, key: Key) -> None:
        """The item was done, or there is nothing left to do (its file was removed, written again): no failure."""
        self._failures.pop(key, None)

    def get(self, key: Key) -> Failure | None:
        return self._failures.get(key)

    def take_due(self, now: float) -> list[Key]:
        """The items whose back-off is over, to try again now; each is due again only after its next failure."""
        due = [
            key for key, failure in self._failures.items() if failure.next_try is not None and failure.next_try <= now
        ]
        for key in due:
            self._failures[key].next_try = math.inf  # being tried: waiting for the outcome
        return due

    def retry_now(self, now: float) -> None:
        """Make every failed item due now, a bug's too (a drain starting: the grid may be back, and it is tried
        once more before unmount says what stays queued)."""
        for failure in self._failures.values():
            if failure.next_try != math.inf:
                failure.next_try = now

    def next_due(self) -> float:
        """When the next item's back-off is over (infinity: none is waiting for one)."""
        return min((f.next_try for f in self._failures.values() if f.next_try is not None), default=math.inf)

    def __len__(self) -> int:
        return len(self._failures)

    def describe(self, key: Key, name: str, now: float) -> dict[str, Any]:
        """One failing item as JSON-able data, for `queue_state`."""
        failure = self._failures[key]
        if failure.next_try is None:
            next_try: float | str = "never (not a grid error: see the log)"
        else:
            next_try = 0.0 if failure.next_try == math.inf else max(0.0, round(failure.next_try - now, 1))
        return {"item": name, "error": failure.error, "attempts": failure.attempts, "next_try_in": next_try}

    def failing(self) -> list[Key]:
        return list(self._failures)
