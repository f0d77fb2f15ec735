"""The trio side of retries.py: a failed upload or publish kept as state, logged, and tried again once its back-off
is over, by one task per kind of work (not one retry loop per item)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import trio

from .retries import Failures

log = logging.getLogger("blackmatch.retries")

Key = TypeVar("Key", bound=Hashable)


class RetryTimer(Generic[Key]):
    """The failures of one kind of work, and `run`, the task that hands each to `retry` when it is due."""

    def __init__(self, retry: Callable[[Key], None]) -> None:
        self.failures: Failures[Key] = Failures()
        self._retry = retry
        self._noted = trio.Event()  # wakes `run`: a new back-off to wait for

    def failed(self, key: Key, exc: Exception, what: str) -> None:
        """Keep the failure and log it: a grid error to retry after its back-off, any other error (a bug) with its
        traceback, not retried until something asks for it again (`retry_now`)."""
        failure = self.failures.failed(key, exc, trio.current_time())
        if failure.next_try is None:
            log.error("%s failed by an unexpected error; not retried on its own", what, exc_info=exc)
        else:
            wait = failure.next_try - trio.current_time()
            log.warning("%s failed (%d tries), next try in %.0f s: %s", what, failure.attempts, wait, exc)
            self._noted.set()

    def retry_now(self) -> None:
        """Try every failed item again now, a bug's too (a drain starting: the grid may be back)."""
        self.failures.retry_now(trio.current_time())
        self._noted.set()

    async def run(self) -> None:
        while True:
            noted = self._noted
            with trio.move_on_at(self.failures.next_due()):
                await noted.wait()
            if noted.is_set():
                self._noted = trio.Event()
            for key in self.failures.take_due(trio.current_time()):
                self._retry(key)
