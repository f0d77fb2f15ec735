"""The root's one publisher: when each directory's pending changes go to the grid, how many at once, and what
happens when a directory update fails.

Changes made within PUBLISH_COALESCE of each other go out in one directory update; an urgent request (fsync, a
drain) does not wait. PUBLISHES_AT_ONCE updates run at a time, each in a task that ends with it, and a directory is
never published twice at once: asked for again meanwhile, it is published again after. A failed update is kept in
`retries` (its error, its tries, its next try) and tried again after its back-off. What a publish does is the
filesystem's `publish` callable; this module only schedules it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

from .retry_timer import RetryTimer

PUBLISH_COALESCE = 0.05  # seconds a directory waits for more changes before it publishes
PUBLISHES_AT_ONCE = 8  # directory updates in flight at once


class Publisher:
    """Schedules `publish(key)` for directories (by cap string); `has_ready(key)` says whether one has changes
    ready to publish, for retries."""

    def __init__(self, publish: Callable[[str], Awaitable[None]], has_ready: Callable[[str], bool]) -> None:
        self._publish = publish
        self._has_ready = has_ready
        self._due: dict[str, float] = {}  # directories to publish, and from when (a moment to coalesce)
        self._publishing: set[str] = set()
        self._round_done: dict[str, trio.Event] = {}  # for waiters (fsync): set when the directory's publish ends
        self._wanted = trio.Event()  # wakes `run`: a directory to publish, or a publish ended
        self.retries: RetryTimer[str] = RetryTimer(self._retry)

    def want(self, key: str, urgent: bool = False) -> None:
        """Have the directory published: at once if urgent, else after PUBLISH_COALESCE, so that the changes made
        meanwhile go in the same update."""
        at = trio.current_time() + (0 if urgent else PUBLISH_COALESCE)
        self._due[key] = min(at, self._due.get(key, at))
        self._wanted.set()

    async def round(self, key: str) -> None:
        """Ask for the directory to be published now, and wait until that publish (or the one running) ends."""
        done = self._round_done.setdefault(key, trio.Event())
        self.want(key, urgent=True)
        await done.wait()

    def busy(self, key: str) -> bool:
        """Whether the directory is due, being published, waited for, or failing."""
        return (
            key in self._due
            or key in self._publishing
            or key in self._round_done
            or self.retries.failures.get(key) is not None
        )

    def in_flight(self) -> int:
        return len(self._publishing)

    def waiting(self, ready: list[str]) -> int:
        """How many of these directories with ready changes are not being published now."""
        return len(set(ready) - self._publishing)

    def _retry(self, key: str) -> None:
        if self._has_ready(key):
            self.want(key)
        else:
            self.retries.failures.succeeded(key)

    async def run(self) -> None:
        async with trio.open_nursery() as running:
            running.start_soon(self.retries.run)
            slots = trio.Semaphore(PUBLISHES_AT_ONCE)
            while True:
                wanted = self._wanted
                now = trio.current_time()
                waiting = {key: at for key, at in self._due.items() if key not in self._publishing}
                for key in [key for key, at in waiting.items() if at <= now]:
                    await slots.acquire()
                    del self._due[key]
                    self._publishing.add(key)
                    running.start_soon(self._publish_one, key, slots)
                next_due = min((at for key, at in self._due.items() if key not in self._publishing), default=math.inf)
                with trio.move_on_at(next_due):
                    await wanted.wait()
                if wanted.is_set():
                    self._wanted = trio.Event()

    async def _publish_one(self, key: str, slots: trio.Semaphore) -> None:
        """One publish, its outcome kept, and its waiters woken. A background publish must never take the mount
        down: whatever it raises is a failure of this directory's update."""
        try:
            await self._publish(key)
        except Exception as exc:
            self.retries.failed(key, exc, "directory update")
        else:
            self.retries.failures.succeeded(key)
        finally:
            self._publishing.discard(key)
            slots.release()
            done = self._round_done.pop(key, None)
            if done is not None:
                done.set()
            self._wanted.set()
