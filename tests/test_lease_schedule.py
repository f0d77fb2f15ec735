"""The lease-renewal schedule on its own: when cycles are due, and that a cycle cut short any number of times,
saved and resumed, finds what one run straight through finds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from grid_server.lease_schedule import (
    FAILED_PATHS_KEPT,
    FIRST_CYCLE_DELAY,
    CycleResult,
    Done,
    Idle,
    Path,
    Running,
    Schedule,
    Tally,
    due_at,
    finish,
    first_schedule,
    from_json,
    is_done,
    last_result,
    renewed,
    skipped,
    start,
    to_json,
    unlisted,
)

DAY = 86400

LITERAL = "literal"
Outcome = tuple[frozenset[str], bool | None] | str
"""The servers that failed to renew the object and what background repair did (None: nothing), or LITERAL."""


def saved_and_loaded(schedule: Schedule) -> Schedule | None:
    return from_json(json.loads(json.dumps(to_json(schedule))))


def test_the_first_cycle_is_due_soon_after_the_first_mount_and_then_one_interval_after_each_end() -> None:
    assert first_schedule(1000.0, 7 * DAY) == Idle(1000.0 + FIRST_CYCLE_DELAY)
    assert first_schedule(1000.0, 5) == Idle(1005.0)  # a short interval (tests) is not held up
    running = start(Idle(1000.0), now=1200.0)
    assert due_at(running, 7 * DAY) is None  # under way: goes on at once, after a restart too
    done = finish(renewed(running, (), []), now=1300.0)
    assert due_at(done, 7 * DAY) == 1300.0 + 7 * DAY
    assert last_result(done) == CycleResult(1200.0, 1300.0, Tally(renewed=1))
    again = start(done, now=2000.0)
    assert (again.position, again.tally, again.last) == (None, Tally(), done.result)  # the last result stays shown
    assert last_result(again) == done.result
    assert start(again, now=3000.0) is again


def test_outcomes_are_tallied_and_unlisted_directories_noted_once() -> None:
    running = start(Idle(0.0), now=1.0)
    running = renewed(running, (), [])
    running = renewed(running, ("a",), ["alpha"])
    running = unlisted(unlisted(running, ("a",)), ("a",))
    running = skipped(running, ("b",))
    running = renewed(running, ("c",), ["beta", "alpha"])
    running = renewed(running, ("d",), [], repaired=True)
    running = renewed(running, ("e",), [], repaired=False)
    assert running.tally == Tally(
        renewed=3,
        errors=2,
        skipped=1,
        failed_servers=frozenset({"alpha", "beta"}),
        unlisted=(("a",),),
        repaired=1,
        repair_failures=1,
        repair_failed=(("e",),),
    )
    assert running.tally.objects == 6 and running.position == ("e",)
    assert is_done(running, ("a", "z")) and is_done(running, ("e",)) and not is_done(running, ("e", "f"))


paths = st.lists(st.lists(st.sampled_from("abc"), max_size=3).map(tuple), unique=True).map(sorted)
outcomes = st.one_of(
    st.just(LITERAL), st.tuples(st.frozensets(st.sampled_from(["alpha", "beta"])), st.sampled_from([None, True, False]))
)


@st.composite
def walks(draw: st.DrawFn) -> list[tuple[Path, Outcome, bool]]:
    """A walk's objects in its order (sorted paths), each with its outcome and whether it is a directory that
    cannot be listed."""
    return [(path, draw(outcomes), draw(st.booleans())) for path in draw(paths)]


def run(schedule: Schedule, walk: list[tuple[Path, Outcome, bool]], stop_after: int | None) -> Schedule:
    """What the renewal task does with a cycle: from where the schedule stands, over the whole walk (a resumed
    cycle passes over what it did), stopped (a crash, a restart) after `stop_after` objects renewed."""
    running = start(schedule, now=100.0)
    done = 0
    for path, outcome, cannot_list in walk:
        if not is_done(running, path):
            if done == stop_after:
                return running
            running = skipped(running, path) if isinstance(outcome, str) else renewed(running, path, *outcome)
            done += 1
        if cannot_list:  # the walk reads the directory after the caller had it: again in a resumed cycle
            running = unlisted(running, path)
    return finish(running, now=200.0)


@given(walks(), st.lists(st.integers(min_value=0, max_value=5), max_size=6))
def test_a_cycle_stopped_and_resumed_any_number_of_times_finds_what_one_straight_run_finds(
    walk: list[tuple[Path, Outcome, bool]], stops: list[int]
) -> None:
    straight = run(Idle(0.0), walk, None)
    schedule: Schedule = Idle(0.0)
    for stop in stops:
        schedule = run(schedule, walk, stop)
        loaded = saved_and_loaded(schedule)
        assert loaded == schedule
        schedule = loaded
        if isinstance(schedule, Done):
            break
    if not isinstance(schedule, Done):
        schedule = run(schedule, walk, None)
    assert schedule == straight
    assert isinstance(straight, Done)
    tally = straight.result.tally
    assert tally.objects == len(walk)
    assert tally.skipped == sum(outcome == LITERAL for _path, outcome, _cannot in walk)
    assert tally.unlisted == tuple(path for path, _outcome, cannot_list in walk if cannot_list)
    assert tally.repaired == sum(outcome != LITERAL and outcome[1] is True for _path, outcome, _cannot in walk)
    assert tally.repair_failed == tuple(
        path for path, outcome, _c in walk if outcome != LITERAL and outcome[1] is False
    )


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    _containers,
    max_leaves=12,
)


@given(json_values)
def test_anything_else_saved_is_no_schedule(saved: Any) -> None:
    assert from_json(saved) is None


@given(walks(), st.integers(min_value=0, max_value=5))
def test_a_damaged_field_of_a_saved_schedule_makes_it_no_schedule(
    walk: list[tuple[Path, Outcome, bool]], stop: int
) -> None:
    saved = to_json(run(Idle(0.0), walk, stop))
    assert from_json(saved) is not None
    for key in saved:
        assert from_json({**saved, key: "damaged"}) is None
    assert from_json({**saved, "format": 2}) is None
    if isinstance(saved.get("tally"), dict):
        assert from_json({**saved, "tally": {**saved["tally"], "renewed": -1}}) is None


def test_running_is_saved_with_its_position_and_the_last_result() -> None:
    last = CycleResult(1.0, 2.0, Tally(renewed=3, unlisted=(("x", "y"),), repaired=2, repair_failed=(("z",),)))
    running = Running(5.0, ("a", "b"), Tally(errors=1, failed_servers=frozenset({"alpha"})), last)
    assert saved_and_loaded(running) == running
    assert saved_and_loaded(Done(last)) == Done(last)


def test_failed_repairs_are_all_counted_and_the_first_ones_named() -> None:
    """A grid too small to be happy fails every repair: the result stays small, as it is saved after each object."""
    running = start(Idle(0.0), now=1.0)
    for number in range(FAILED_PATHS_KEPT + 5):
        running = renewed(running, (f"{number:03}",), [], repaired=False)
    assert running.tally.repair_failures == FAILED_PATHS_KEPT + 5
    assert running.tally.repair_failed == tuple((f"{number:03}",) for number in range(FAILED_PATHS_KEPT))
    assert saved_and_loaded(running) == running


def test_a_schedule_saved_before_background_repair_loads_with_no_repairs() -> None:
    saved = to_json(Done(CycleResult(1.0, 2.0, Tally(renewed=3))))
    for key in ("repaired", "repair_failures", "repair_failed"):
        del saved["result"]["tally"][key]
    assert from_json(saved) == Done(CycleResult(1.0, 2.0, Tally(renewed=3)))
