"""The timeline's geometry (``dashboard.web.timeline``), called directly: no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dashboard.web.timeline import (
    GAP,
    MIN_WIDTH,
    TERM,
    UNKNOWN,
    Action,
    TermSpan,
    build,
    human,
    ticks,
)

T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def kinds(timeline) -> list[tuple[str, float, float]]:
    return [(s.kind, s.x, s.width) for s in timeline.segments]


def test_terms_and_the_gap_between_them_cover_the_window_in_percent() -> None:
    terms = [
        TermSpan("web-1", 7, at(-30), at(15), "expired"),
        TermSpan("web-2", 8, at(21), None),
    ]
    timeline = build(terms, [], T0, T0 + HOUR)
    assert kinds(timeline) == [(TERM, 0.0, 25.0), (GAP, 25.0, 10.0), (TERM, 35.0, 65.0)]
    first, gap, current = timeline.segments
    assert (first.leader, first.token, first.end_reason, first.ongoing) == (
        "web-1",
        7,
        "expired",
        False,
    )
    assert (gap.start, gap.end, gap.seconds) == (at(15), at(21), 360.0)
    assert current.ongoing and current.end == T0 + HOUR
    assert timeline.gaps == [gap]


def test_nobody_leading_now_is_a_gap_up_to_the_end() -> None:
    timeline = build([TermSpan("web-1", 3, at(-5), at(48), "lost")], [], T0, T0 + HOUR)
    assert kinds(timeline) == [(TERM, 0.0, 80.0), (GAP, 80.0, 20.0)]
    assert timeline.segments[-1].ongoing


def test_time_before_the_first_term_ever_is_not_a_gap() -> None:
    terms = [TermSpan("web-1", 1, at(30), None)]
    assert kinds(build(terms, [], T0, T0 + HOUR)) == [(UNKNOWN, 0.0, 50.0), (TERM, 50.0, 50.0)]
    # A term before the window (not drawn) means the seat was empty: a gap.
    assert kinds(build(terms, [], T0, T0 + HOUR, led_before=True))[0] == (GAP, 0.0, 50.0)
    # An election nobody ever led is unknown throughout, not one long gap.
    assert kinds(build([], [], T0, T0 + HOUR)) == [(UNKNOWN, 0.0, 100.0)]


def test_terms_outside_the_window_are_left_out_and_overlaps_make_no_gap() -> None:
    terms = [
        TermSpan("old", 1, at(-120), at(-60), "resigned"),
        TermSpan("a", 2, at(-10), at(40), "superseded"),
        TermSpan("b", 3, at(30), None),  # began before a's end was recorded
    ]
    timeline = build(terms, [], T0, T0 + HOUR)
    assert [s.leader for s in timeline.segments] == ["a", "b"]
    assert timeline.gaps == []


def test_a_step_down_names_its_actor_on_the_term_it_ended_and_as_a_marker() -> None:
    terms = [
        TermSpan("web-1", 7, at(0), at(30), "forced"),
        TermSpan("web-2", 8, at(30.01), None),
    ]
    actions = [
        Action(at(29.9), "step-down", "alice", "done", token=7, reason="kernel upgrade"),
        Action(at(45), "switchover", "bob", "failed", token=8, successor="web-1"),
    ]
    timeline = build(terms, actions, T0, T0 + HOUR)
    ended, current = (s for s in timeline.segments if s.kind == TERM)
    assert (ended.end_reason, ended.actor) == ("forced", "alice")
    assert current.actor == ""  # a failed command ended nothing; and the term goes on
    assert [(m.kind, m.actor, m.status, m.x) for m in timeline.markers] == [
        ("step-down", "alice", "done", 49.833),
        ("switchover", "bob", "failed", 75.0),
    ]


def test_a_subsecond_gap_in_hours_is_still_drawn_and_stays_inside() -> None:
    terms = [
        TermSpan("a", 1, T0 - HOUR, at(359.9), "resigned"),
        TermSpan("b", 2, at(359.9) + timedelta(milliseconds=300), None),
    ]
    timeline = build(terms, [], T0, T0 + 6 * HOUR)
    [gap] = timeline.gaps
    assert gap.width == MIN_WIDTH and gap.seconds == pytest.approx(0.3)
    last = timeline.segments[-1]
    assert last.width == MIN_WIDTH and last.x + last.width <= 100.0


def test_ticks_fall_on_round_times_and_are_few() -> None:
    start = datetime(2026, 11, 23, 6, 7, 13, 500, tzinfo=UTC)
    found = ticks(start, start + 6 * HOUR)
    assert 3 <= len(found) <= 8
    assert all(t.at.minute == 0 and t.at.second == 0 and t.at.microsecond == 0 for t in found)
    assert found[0].at == datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
    assert [t.label for t in ticks(T0, T0 + HOUR)][::3] == [
        "06:00",
        "06:30",
        "07:00",
    ]
    assert all(0 <= t.x <= 100 for t in found)
    # A short history (a new election) gets ticks in seconds.
    short = ticks(T0, T0 + timedelta(seconds=70))
    assert [t.label for t in short][:2] == ["06:00:00", "06:00:10"] and len(short) == 8


def test_an_empty_window_is_refused_and_durations_read_well() -> None:
    with pytest.raises(ValueError):
        build([], [], T0, T0)
    assert [human(s) for s in (0.42, 12.34, 245, 7800)] == ["0.42 s", "12.3 s", "4m 05s", "2h 10m"]
