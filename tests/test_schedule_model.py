"""The schedule model (``packmule._model.schedule``, issue 19): when schedules
tick, across DST changes too, what ``due`` fires after a gap under each misfire
policy, and tick run names.  Time is whatever datetime a test passes in: no
clock, no sleep."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from packmule._model.keys import check_name
from packmule._model.schedule import Plan, Schedule, cron, due, every, parse_tick, tick_name

UTC = timezone.utc
T0 = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)  # a tick of every schedule below (a whole hour)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def local_day(tz: str, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    """(just before local midnight starting the day, just before the next local midnight)."""
    zone = ZoneInfo(tz)
    start = datetime(year, month, day, tzinfo=zone)
    nxt = start.date() + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    return start - timedelta(microseconds=1), end - timedelta(microseconds=1)


# --- every ---------------------------------------------------------------------------------------------------


def test_every_ticks_at_multiples_of_its_interval_since_the_epoch():
    ticks = every(seconds=7).ticks(T0, T0 + timedelta(minutes=1))
    assert ticks and all(int(t.timestamp()) % 7 == 0 for t in ticks)
    assert [b - a for a, b in zip(ticks, ticks[1:], strict=False)] == [timedelta(seconds=7)] * (len(ticks) - 1)
    assert len(ticks) == 9 and all(t.tzinfo is UTC for t in ticks)


def test_every_ticks_exclude_after_and_include_until():
    assert every(minutes=1).ticks(T0, T0 + timedelta(minutes=3)) == [
        T0 + timedelta(minutes=1), T0 + timedelta(minutes=2), T0 + timedelta(minutes=3)]


def test_every_ticks_between_ticks_round_to_the_ticks_inside():
    ticks = every(minutes=1).ticks(T0 + timedelta(seconds=30), T0 + timedelta(minutes=2, seconds=59.5))
    assert ticks == [T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)]


def test_every_ticks_stop_at_the_limit_keeping_the_earliest():
    assert every(seconds=1).ticks(T0, T0 + timedelta(days=1), limit=3) == [
        T0 + timedelta(seconds=1), T0 + timedelta(seconds=2), T0 + timedelta(seconds=3)]


def test_every_next_after_a_tick_is_the_following_tick():
    schedule = every(minutes=5)
    assert schedule.next_after(T0) == T0 + timedelta(minutes=5)
    assert schedule.next_after(T0 - timedelta(microseconds=1)) == T0


def test_every_units_add_up_and_interval_is_the_same_schedule():
    assert every(hours=1, minutes=30).interval == timedelta(minutes=90)
    assert every(minutes=0.5) == every(interval=timedelta(seconds=30)) == every(30)


# --- cron ----------------------------------------------------------------------------------------------------


def test_cron_in_utc_ticks_where_the_expression_matches():
    ticks = cron("*/15 * * * *").ticks(T0, T0 + timedelta(hours=1))
    assert ticks == [T0 + timedelta(minutes=m) for m in (15, 30, 45, 60)]


def test_cron_next_after_is_strictly_after():
    schedule = cron("30 2 * * *")
    assert schedule.next_after(at(2026, 12, 5, 2, 30)) == at(2026, 12, 6, 2, 30)
    assert schedule.next_after(at(2026, 12, 5, 2, 29, 59)) == at(2026, 12, 5, 2, 30)


def test_cron_reads_its_times_in_its_time_zone():
    # 09:00 in Berlin is 08:00 UTC in winter
    assert cron("0 9 * * *", tz="Europe/Berlin").next_after(at(2026, 12, 5)) == at(2026, 12, 5, 8)


def test_cron_ticks_stop_at_the_limit():
    assert len(cron("* * * * *").ticks(T0, T0 + timedelta(days=1), limit=5)) == 5


# --- DST: hourly fires on elapsed time; a fixed time fires once a day ----------------------------------------

DST_DAYS = [
    # tz, day, expression, ticks that day (UTC hh:mm, or a count)
    ("Europe/Berlin", (2026, 3, 29), "0 * * * *", 23),
    ("Europe/Berlin", (2026, 10, 25), "0 * * * *", 25),
    ("America/New_York", (2026, 3, 8), "0 * * * *", 23),
    ("America/New_York", (2026, 11, 1), "0 * * * *", 25),
    ("Europe/Berlin", (2026, 3, 29), "30 2 * * *", ["01:00"]),  # 02:30 does not exist: at 03:00 CEST
    ("Europe/Berlin", (2026, 10, 25), "30 2 * * *", ["00:30"]),  # 02:30 twice: once, at 02:30 CEST
    ("America/New_York", (2026, 3, 8), "30 2 * * *", ["07:00"]),  # 02:30 does not exist: at 03:00 EDT
    ("America/New_York", (2026, 11, 1), "30 1 * * *", ["05:30"]),  # 01:30 twice: once, at 01:30 EDT
    ("Europe/Berlin", (2026, 3, 29), "*/30 2 * * *", []),  # not a fixed time: the 02:xx that don't exist never fire
    ("Europe/Berlin", (2026, 10, 25), "*/30 2 * * *", ["00:00", "00:30", "01:00", "01:30"]),  # both 02:xx hours
]


@pytest.mark.parametrize(("tz", "day", "expr", "expected"), DST_DAYS)
def test_a_dst_day_fires_the_documented_ticks(tz, day, expr, expected):
    ticks = cron(expr, tz=tz).ticks(*local_day(tz, *day))
    if isinstance(expected, int):
        assert len(ticks) == expected
        assert all(b - a == timedelta(hours=1) for a, b in zip(ticks, ticks[1:], strict=False))
    else:
        assert [t.strftime("%H:%M") for t in ticks] == expected


@pytest.mark.parametrize(("tz", "day", "expr", "expected"), DST_DAYS)
def test_the_tick_run_names_of_a_dst_day_are_unique(tz, day, expr, expected):
    ticks = cron(expr, tz=tz).ticks(*local_day(tz, *day))
    names = [tick_name("Reports", "nightly", t) for t in ticks]
    assert len(set(names)) == len(names) == len(ticks)


@pytest.mark.parametrize(("tz", "day", "expr", "expected"), DST_DAYS)
def test_the_newest_tick_agrees_with_the_forward_ticks_through_a_dst_day(tz, day, expr, expected):
    schedule = cron(expr, tz=tz)
    start, end = local_day(tz, *day)
    forward = schedule.ticks(start - timedelta(days=2), end)
    for minutes in range(0, 24 * 60 + 1, 10):
        now = start + timedelta(minutes=minutes)
        assert schedule.latest(now) == max(t for t in forward if t <= now)


def test_a_start_in_the_repeated_hour_does_not_fire_its_first_occurrence_again():
    # 02:15 CET (the second 02:15) on 2026-10-25 is after 02:30 CEST fired
    second_0215 = datetime(2026, 10, 25, 2, 15, fold=1, tzinfo=ZoneInfo("Europe/Berlin"))
    assert cron("30 2 * * *", tz="Europe/Berlin").next_after(second_0215) == at(2026, 10, 26, 1, 30)


# --- due: the misfire policies after a gap of 5 ticks --------------------------------------------------------

GAP = [T0 + timedelta(minutes=10 * k) for k in range(1, 6)]  # ticks of every(minutes=10) after T0
NOW = GAP[-1] + timedelta(seconds=30)


def test_skip_fires_the_ticks_within_grace_and_skips_the_rest():
    plan = due(every(minutes=10, grace=timedelta(minutes=25)), T0, NOW)
    assert (plan.fire, plan.skipped, plan.late, plan.new_last) == (GAP[2:], 2, 0, GAP[-1])


def test_skip_with_the_default_grace_fires_only_the_newest_tick_of_a_gap():
    plan = due(every(minutes=10), T0, NOW)
    assert (plan.fire, plan.skipped, plan.late, plan.new_last) == (GAP[-1:], 4, 0, GAP[-1])


def test_skip_fires_nothing_when_every_tick_is_past_its_grace():
    plan = due(every(minutes=10, grace=10), T0, NOW)
    assert (plan.fire, plan.skipped, plan.late, plan.new_last) == ([], 5, 0, GAP[-1])


def test_a_tick_exactly_grace_old_still_fires():
    schedule = every(minutes=10, grace=30)
    tick = T0 + timedelta(minutes=10)
    assert due(schedule, T0, tick + timedelta(seconds=30)).fire == [tick]
    assert due(schedule, T0, tick + timedelta(seconds=30, microseconds=1)).fire == []


def test_latest_fires_the_newest_tick_even_past_its_grace():
    plan = due(every(minutes=10, misfire="latest", grace=10), T0, NOW)
    assert (plan.fire, plan.skipped, plan.late, plan.new_last) == (GAP[-1:], 4, 1, GAP[-1])


def test_all_fires_every_tick_of_the_gap_and_counts_the_late_ones():
    plan = due(every(minutes=10, misfire="all"), T0, NOW)
    assert (plan.fire, plan.skipped, plan.late, plan.new_last) == (GAP, 0, 4, GAP[-1])
    assert not plan.backlog


def test_all_fires_at_most_limit_ticks_the_newest_and_reports_the_backlog():
    plan = due(every(minutes=10, misfire="all"), T0, NOW, limit=3)
    assert (plan.fire, plan.new_last, plan.backlog) == (GAP[2:], GAP[-1], True)


def test_a_gap_of_cron_ticks_follows_the_same_policies():
    schedule = cron("*/10 * * * *", misfire="latest", grace=10)
    plan = due(schedule, T0, NOW)
    assert (plan.fire, plan.skipped, plan.late, plan.new_last) == (GAP[-1:], 4, 1, GAP[-1])


def test_the_default_grace_of_a_daily_tick_is_one_hour():
    for schedule in (every(hours=24), cron("0 0 * * *")):
        midnight = at(2026, 12, 6)
        assert due(schedule, at(2026, 12, 5), midnight + timedelta(minutes=59)).fire == [midnight]
        assert due(schedule, at(2026, 12, 5), midnight + timedelta(minutes=61)).fire == []


def test_an_on_time_tick_fires_and_is_not_late():
    plan = due(every(minutes=10), T0, T0 + timedelta(minutes=10))
    assert (plan.fire, plan.skipped, plan.late) == ([T0 + timedelta(minutes=10)], 0, 0)


def test_no_new_tick_fires_nothing_and_keeps_last():
    assert due(every(minutes=10), T0, T0 + timedelta(minutes=9)) == due(every(minutes=10), T0, T0) == (
        due(every(minutes=10), T0, T0 - timedelta(hours=1)))
    assert due(every(minutes=10), T0, T0 + timedelta(minutes=9)).new_last == T0


# --- due: first sight -----------------------------------------------------------------------------------------


def test_first_sight_fires_nothing_and_records_the_newest_tick_at_or_before_now():
    plan = due(every(minutes=10, misfire="all"), None, T0 + timedelta(minutes=25))
    assert (plan.fire, plan.skipped, plan.late, plan.new_last) == ([], 0, 0, T0 + timedelta(minutes=20))


def test_after_first_sight_the_next_tick_fires_normally():
    schedule = cron("*/10 * * * *")
    first = due(schedule, None, T0 + timedelta(minutes=25))
    assert due(schedule, first.new_last, T0 + timedelta(minutes=30, seconds=1)).fire == [T0 + timedelta(minutes=30)]


def test_first_sight_exactly_on_a_tick_does_not_fire_it():
    assert due(every(minutes=10, misfire="all"), None, T0) == Plan([], 0, 0, T0)


# --- decorators -----------------------------------------------------------------------------------------------


def test_every_decorates_a_method_and_returns_it_callable_by_hand():
    def refresh(x: int) -> int:
        return x + 1

    decorated = every(seconds=5)(refresh)
    assert decorated is refresh and refresh(1) == 2
    schedule = refresh.__packmule_schedule__  # type: ignore[attr-defined]
    assert (schedule.kind, schedule.interval, schedule.misfire, schedule.method) == (
        "every", timedelta(seconds=5), "skip", None)


def test_cron_serves_as_a_value_of_a_schedules_mapping_and_is_bound_by_name():
    schedules = {"nightly": cron("30 2 * * *", tz="Europe/Berlin", misfire="all", grace=60)}
    bound = schedules["nightly"].bound("nightly")
    assert isinstance(bound, Schedule)
    assert (bound.method, bound.expr, bound.tz, bound.grace) == (
        "nightly", "30 2 * * *", ZoneInfo("Europe/Berlin"), timedelta(minutes=1))


def test_a_schedule_built_directly_takes_a_zone_name_and_grace_in_seconds():
    schedule = Schedule("cron", expr="0 0 * * *", tz="Europe/Berlin", grace=90)  # type: ignore[arg-type]
    assert (schedule.tz, schedule.grace) == (ZoneInfo("Europe/Berlin"), timedelta(seconds=90))


def test_a_method_takes_one_schedule_by_decoration():
    def nightly() -> None: ...

    cron("30 2 * * *")(nightly)
    with pytest.raises(ValueError, match="already has a schedule"):
        every(minutes=1)(nightly)
    assert nightly.__packmule_schedule__.kind == "cron"  # type: ignore[attr-defined]


# --- bad input ------------------------------------------------------------------------------------------------

BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: cron("61 * * * *"), "not valid"),
    (lambda: cron("* * *"), "not valid"),
    (lambda: cron("every day"), "not valid"),
    (lambda: cron("* * */20 * 1L"), "never matches"),
    (lambda: cron("0 0 * * *", tz="Mars/Olympus_Mons"), "unknown time zone"),
    (lambda: cron("0 0 * * *", tz=""), "unknown time zone"),
    (lambda: every(), "needs an interval"),
    (lambda: every(seconds=0), "at least 1 s"),
    (lambda: every(seconds=-5), "at least 1 s"),
    (lambda: every(seconds=0.5), "at least 1 s"),
    (lambda: every(seconds=1.5), "whole number of seconds"),
    (lambda: every(interval=timedelta(milliseconds=2500)), "whole number of seconds"),
    (lambda: every(seconds=5, misfire="sometimes"), "not one of"),  # type: ignore[arg-type]
    (lambda: cron("0 0 * * *", misfire="never"), "not one of"),  # type: ignore[arg-type]
    (lambda: every(seconds=5, grace=-1), "is negative"),
    (lambda: cron("0 0 * * *", grace=timedelta(seconds=-1)), "is negative"),
    (lambda: every(seconds=5, interval=timedelta(seconds=5)), "one or the other"),
    (lambda: every(minutes=0, interval=timedelta(seconds=5)), "one or the other"),
    (lambda: due(every(seconds=5), None, datetime(2026, 12, 5)), "aware datetime"),
    (lambda: every(seconds=5).ticks(T0, datetime(2026, 12, 6)), "aware datetime"),
    (lambda: tick_name("Reports", "nightly", T0 + timedelta(microseconds=1)), "whole second"),
    (lambda: tick_name("Reports", "a.b", T0), "without '.'"),
    (lambda: tick_name("Repörts", "nightly", T0), "not allowed"),
]


@pytest.mark.parametrize(("call", "message"), BAD)
def test_bad_input_raises_value_error_naming_the_cause(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_bad_schedule_leaves_the_function_undecorated():
    def job() -> None: ...

    with pytest.raises(ValueError):
        every(seconds=0)(job)
    assert not hasattr(job, "__packmule_schedule__")


# --- tick run names -------------------------------------------------------------------------------------------


def test_tick_name_is_class_method_and_the_utc_tick_in_whole_seconds():
    berlin = datetime(2026, 12, 5, 2, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    assert tick_name("Reports", "nightly", berlin) == "Reports.nightly:20261205T013000Z"


def test_tick_names_are_valid_run_names_and_parse_back_to_their_tick():
    for cls_name in ("Reports", "Outer.Inner", "my_app-v2"):
        for tick in cron("17 */3 * * *", tz="America/New_York").ticks(*local_day("America/New_York", 2026, 11, 1)):
            name = tick_name(cls_name, "_refresh", tick)
            assert check_name(name) == name
            assert parse_tick(name) == tick and parse_tick(name).tzinfo is UTC  # type: ignore[union-attr]


@pytest.mark.parametrize("name", [
    "nightly", "Reports.nightly", "run-1", "Reports.nightly:2026", "Reports.nightly:20261205T013000",
    "Reports.nightly:20261399T013000Z", "nightly:20261205T013000Z", "Reports.nightly:20261205T013000Z:x",
    "Reports.nightly-20261205T013000Z", "",
])
def test_parse_tick_rejects_names_that_are_not_tick_run_names(name):
    assert parse_tick(name) is None
