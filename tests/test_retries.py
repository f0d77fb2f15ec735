"""Failing uploads and publishes as state (grid_server/retries.py): capped back-off for grid errors, none for bugs."""

from __future__ import annotations

import math

from grid_server.retries import FIRST_DELAY, MAX_DELAY, Failures
from lafs_core.errors import NotEnoughSharesError


def test_grid_errors_back_off_doubling_up_to_the_cap() -> None:
    failures: Failures[str] = Failures()
    now, waits = 1000.0, []
    for _ in range(12):
        failure = failures.failed("f", NotEnoughSharesError("no servers"), now)
        assert failure.next_try is not None
        waits.append(failure.next_try - now)
        assert failures.take_due(now) == []  # not before its time
        now = failure.next_try
        assert failures.take_due(now) == ["f"]
        assert failures.take_due(now) == []  # being tried: due again only after its next failure
        assert failures.next_due() == math.inf
    assert waits[:4] == [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY, 8 * FIRST_DELAY]
    assert waits[-1] == MAX_DELAY and max(waits) == MAX_DELAY
    state = failures.describe("f", "/a/file", now)
    assert state == {"item": "/a/file", "error": "no servers", "attempts": 12, "next_try_in": 0.0}
    failures.succeeded("f")
    assert len(failures) == 0 and failures.get("f") is None


def test_a_bug_is_kept_as_failed_and_never_due() -> None:
    failures: Failures[str] = Failures()
    failure = failures.failed("d", KeyError("oops"), 5.0)
    assert failure.next_try is None and failure.attempts == 1
    assert failures.take_due(math.inf) == [] and failures.next_due() == math.inf
    assert failures.describe("d", "/dir", 5.0)["next_try_in"].startswith("never")


def test_the_next_due_is_the_earliest_back_off() -> None:
    failures: Failures[str] = Failures()
    failures.failed("a", OSError("refused"), 10.0)
    failures.failed("b", OSError("refused"), 11.0)
    assert failures.next_due() == 10.0 + FIRST_DELAY
    assert sorted(failures.failing()) == ["a", "b"]


def test_a_drain_makes_every_failure_due_now() -> None:
    failures: Failures[str] = Failures()
    failures.failed("grid", OSError("refused"), 0.0)
    failures.failed("bug", ValueError("oops"), 0.0)
    failures.retry_now(1.0)
    assert sorted(failures.take_due(1.0)) == ["bug", "grid"]
