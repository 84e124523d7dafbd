"""Periodic schedules (issue 19) as a pure model: the instants a schedule ticks
at, which of them to fire after a gap, and the run name of each tick.  There is
no clock here: the time and the last tick a scheduler recorded are passed in,
so every process that reads the same record at the same time decides the same
thing, and a test moves time by passing another datetime.

Declaring schedules::

    class Reports(packmule.Runner):
        @every(minutes=5)
        def refresh(self): ...

        @cron("30 2 * * *", tz="Europe/Berlin", misfire="latest")
        def nightly(self): ...

        schedules = {"weekly": cron("0 6 * * MON")}   # by method name

``every`` ticks at the multiples of its interval since the Unix epoch (UTC), so
processes agree on the ticks without coordination.  Its interval is a whole
number of seconds, at least 1 s, because a tick's run name carries whole seconds.

``cron`` is evaluated by cronsim, not croniter: cronsim is small, has no
dependencies, is maintained by healthchecks.io for its own cron monitoring,
and states its DST rule (Debian cron's) and tests it.  ``cronsim>=2.7``: 2.7 is
its last release for Python 3.10 (2.8 needs 3.11); the DST code is the same.

DST, as cronsim applies Debian cron's rule (``tests/test_schedule_model.py``):

- a 5-field expression whose minute and hour fields both start with something
  other than ``*`` (a fixed time of day: ``30 2 * * *``, ``0 9-17 * * 1-5``)
  runs on the local wall clock.  A local time skipped by the spring-forward
  fires once, at the first local time after the gap (02:30 in Berlin on
  2026-03-29 fires at 03:00 CEST); one that occurs twice fires once, at its
  first occurrence (02:30 CEST on 2026-10-25, not 02:30 CET);
- any other expression (``0 * * * *``, ``*/15 * * * *``, 6 fields with seconds)
  runs on elapsed time: the hourly one fires 23 times on the spring-forward
  day and 25 times on the fall-back day; local times that do not exist never
  fire, and those that occur twice fire twice (two instants).

Every tick is an aware UTC datetime of whole seconds, and ticks are unique
instants (``ticks`` drops any that is not after the one before it), so tick run
names (``tick_name``, in UTC) never collide, not even on a fall-back night.

What ``due`` fires, for the ticks ``t`` with ``last < t <= now``:

- ``skip``: those within their grace (``now - t <= grace``); the rest are skipped;
- ``latest``: the newest one, within its grace or not; the rest are skipped;
- ``all``: every one, oldest first.

A tick's grace, unless the schedule gives one, is the time from the tick to the
next one, clamped to [1 s, 1 h]: a tick is on time until the next is due, and a
daily tick still runs in the hour after a restart.  So with ``skip`` and the
default grace, at most the newest tick of a gap fires.  A fired tick older than
its grace is *late* (``Plan.late``).

A schedule seen for the first time (``last`` is None) fires nothing: its record
starts at the newest tick at or before now (at now if there is none), and the
next tick fires normally.
A clock that went back (``now <= last``) fires nothing and keeps ``last``.
``due`` considers at most ``limit`` ticks (``MAX_TICKS``), the newest: a record
older than that (a scheduler down for long, a fast schedule) passes the older
ticks over uncounted and says so (``Plan.backlog``), so one call stays bounded.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Literal, TypeVar, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from packmule._model.keys import check_name

__all__ = ["MAX_TICKS", "Misfire", "Plan", "Schedule", "cron", "due", "every", "parse_tick", "tick_name"]

Misfire = Literal["skip", "latest", "all"]
F = TypeVar("F", bound=Callable[..., Any])

MAX_TICKS = 10_000  # ticks one ``ticks`` or ``due`` call looks at: ~0.03-0.2 s of cronsim
MIN_GRACE = timedelta(seconds=1)  # the default grace's bounds (a tick's period, clamped)
MAX_GRACE = timedelta(hours=1)
DST_MARGIN = timedelta(hours=3)  # Debian cron's special DST handling covers shifts below 3 h
ATTRIBUTE = "__packmule_schedule__"  # where a decorated method carries its Schedule
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SECOND = timedelta(seconds=1)
CHECK_FROM = datetime(2000, 1, 1)  # a cron expression must tick in cronsim's 50 years from here
TICK_RE = re.compile(r"(?P<head>[A-Za-z0-9_.:\-]*\.[A-Za-z0-9_\-]+):(?P<stamp>[0-9]{8}T[0-9]{6}Z)\Z")
STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Schedule:
    """One schedule of one method: when it ticks and what happens to missed ticks.

    Also a decorator: ``schedule(fn)`` puts it on ``fn`` as ``__packmule_schedule__``
    and returns ``fn`` itself, so ``every``/``cron`` serve as ``@every(...)`` and as
    values of a class's ``schedules`` mapping.  ``method`` is the job method's name,
    which the runner class fills in (``bound``); it is None at decoration."""

    kind: Literal["every", "cron"]
    interval: timedelta | None = None  # every: the period, whole seconds, >= 1 s
    expr: str | None = None  # cron: the expression, 5 fields (or 6, seconds first)
    tz: ZoneInfo | None = None  # cron: the zone the expression reads its times in
    misfire: Misfire = "skip"
    grace: timedelta | None = None  # None: each tick's period, clamped to [1 s, 1 h]
    method: str | None = None

    def __post_init__(self) -> None:
        if self.misfire not in get_args(Misfire):
            raise ValueError(f"misfire {self.misfire!r} is not one of 'skip', 'latest', 'all'")
        object.__setattr__(self, "grace", _grace(self.grace))  # (seconds given to the class itself)
        if self.kind == "every":
            _check_interval(self.interval)
            if self.expr is not None or self.tz is not None:
                raise ValueError("an 'every' schedule has an interval, not a cron expression or time zone")
        elif self.kind == "cron":
            if self.interval is not None or self.expr is None or self.tz is None:
                raise ValueError("a 'cron' schedule has an expression and a time zone, not an interval")
            object.__setattr__(self, "tz", _zone(self.tz))
            _check_expr(self.expr, self.tz)
        else:
            raise ValueError(f"schedule kind {self.kind!r} is not 'every' or 'cron'")

    def __call__(self, fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"a schedule decorates a method, not a {type(fn).__name__}")
        if getattr(fn, ATTRIBUTE, None) is not None:
            raise ValueError(f"{getattr(fn, '__name__', fn)!r} already has a schedule; give a second "
                             "one by name in the class's schedules mapping")
        try:
            setattr(fn, ATTRIBUTE, self)
        except (AttributeError, TypeError):
            raise TypeError(f"cannot put a schedule on {fn!r}: decorate a plain function") from None
        return fn

    def bound(self, method: str) -> Schedule:
        """This schedule for the job method named ``method``."""
        return replace(self, method=method)

    def ticks(self, after: datetime, until: datetime, limit: int = MAX_TICKS) -> list[datetime]:
        """The ticks ``t`` with ``after < t <= until``, oldest first, as UTC datetimes:
        the first ``limit`` of them when there are more."""
        _aware(after, "after")
        _aware(until, "until")
        if self.interval is not None:
            lo, hi = _index(after, self.interval), _index(until, self.interval)
            return [_at(k, self.interval) for k in range(lo + 1, min(hi, lo + limit) + 1)]
        out: list[datetime] = []
        for t in self._forward(after):
            if t > until or len(out) >= limit:
                break
            out.append(t)
        return out

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t``."""
        _aware(t, "t")
        if self.interval is not None:
            return _at(_index(t, self.interval) + 1, self.interval)
        for tick in self._forward(t):
            return tick
        raise ValueError(f"cron expression {self.expr!r} has no tick in the 50 years after {t.isoformat()}")

    def latest(self, now: datetime) -> datetime | None:
        """The newest tick at or before ``now`` (None if there is none in cronsim's 50 years)."""
        newest, _ = self.newest(None, now, 1)
        return newest[-1] if newest else None

    def newest(self, after: datetime | None, until: datetime, n: int) -> tuple[list[datetime], bool]:
        """The newest ``n`` ticks ``t`` with ``after < t <= until``, oldest first, and
        whether older ones in that span were left out."""
        _aware(until, "until")
        if after is not None:
            _aware(after, "after")
        if self.interval is not None:
            hi = _index(until, self.interval)
            lo = hi - n - 1 if after is None else max(_index(after, self.interval), hi - n - 1)
            kept = [_at(k, self.interval) for k in range(lo + 1, hi + 1)]
        else:
            kept = self._cron_newest(after, until, n)
        return kept[-n:], len(kept) > n

    def grace_of(self, tick: datetime, following: datetime | None = None) -> timedelta:
        """How long after ``tick`` firing it is on time; ``following`` is the next
        tick when the caller knows it."""
        if self.grace is not None:
            return self.grace
        period = (following or self.next_after(tick)) - tick
        return min(max(period, MIN_GRACE), MAX_GRACE)

    def _forward(self, after: datetime) -> Iterator[datetime]:
        """cronsim's ticks after ``after`` in UTC, each after the one before: on a
        fall-back night its naive wall-clock walk can return an instant before
        ``after`` (a start in the repeated hour loses its fold) or repeat one."""
        assert self.expr is not None and self.tz is not None
        previous = after.astimezone(timezone.utc)
        for local in CronSim(self.expr, after.astimezone(self.tz)):
            t = local.astimezone(timezone.utc)
            if t > previous:
                previous = t
                yield t

    def _cron_newest(self, after: datetime | None, until: datetime, n: int) -> list[datetime]:
        """Up to ``n + 1`` newest ticks in (after, until]: cronsim walks back ``n + 1``
        ticks to a start, and the forward walk (the one ``ticks`` uses) from a little
        before it decides, so both directions agree on DST nights."""
        assert self.expr is not None and self.tz is not None
        start = until.astimezone(self.tz).replace(microsecond=0) + SECOND
        anchor = None
        for count, local in enumerate(CronSim(self.expr, start, reverse=True), 1):
            anchor = local.astimezone(timezone.utc)
            if count > n or (after is not None and anchor <= after):
                break
        if anchor is None:
            return []
        begin = anchor - DST_MARGIN if after is None else max(after, anchor - DST_MARGIN)
        kept: deque[datetime] = deque(maxlen=n + 1)
        for t in self._forward(begin):
            if t > until:
                break
            kept.append(t)
        return list(kept)


@dataclass(frozen=True)
class Plan:
    """What ``due`` decided: the ticks to fire now (oldest first), how many it
    skipped, how many of those fired are late (older than their grace), the
    record to keep (``new_last``: the newest tick considered, fired or skipped),
    and whether older ticks were passed over uncounted (over ``limit``)."""

    fire: list[datetime]
    skipped: int
    late: int
    new_last: datetime
    backlog: bool = False


def due(schedule: Schedule, last: datetime | None, now: datetime, *, limit: int = MAX_TICKS) -> Plan:
    """Which ticks of ``schedule`` to fire at ``now`` when ``last`` is the newest
    tick already handled (None: the schedule was never seen); see the module
    docstring for the policies."""
    _aware(now, "now")
    now = now.astimezone(timezone.utc)
    if last is None:
        return Plan([], 0, 0, schedule.latest(now) or now.replace(microsecond=0))
    _aware(last, "last")
    last = last.astimezone(timezone.utc)
    if now <= last:
        return Plan([], 0, 0, last)
    if limit < 1:
        raise ValueError(f"limit {limit} must be at least 1")
    recent, backlog = schedule.newest(last, now, limit)
    if not recent:
        return Plan([], 0, 0, last)
    nexts: list[datetime | None] = [*recent[1:], None]
    on_time = [now - t <= schedule.grace_of(t, nxt) for t, nxt in zip(recent, nexts, strict=True)]
    if schedule.misfire == "skip":
        fired = on_time
    elif schedule.misfire == "latest":
        fired = [False] * (len(recent) - 1) + [True]
    else:
        fired = [True] * len(recent)
    fire = [t for t, f in zip(recent, fired, strict=True) if f]
    late = sum(1 for f, ok in zip(fired, on_time, strict=True) if f and not ok)
    return Plan(fire, len(recent) - len(fire), late, recent[-1], backlog)


def every(seconds: float | None = None, minutes: float | None = None, hours: float | None = None, *,
          interval: timedelta | None = None, misfire: Misfire = "skip",
          grace: timedelta | float | None = None) -> Schedule:
    """A schedule that ticks every ``interval`` (or ``seconds + minutes + hours``,
    which may be fractions), at the multiples of it since the Unix epoch; ``grace``
    is a timedelta or seconds."""
    parts = {"seconds": seconds, "minutes": minutes, "hours": hours}
    given = {unit: value for unit, value in parts.items() if value is not None}
    if interval is not None and given:
        raise ValueError(f"every() got interval= and {', '.join(given)}=: give one or the other")
    if interval is None:
        for unit, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"every({unit}=...) takes a number, not {type(value).__name__}")
        interval = timedelta(**given) if given else None
    return Schedule("every", interval=interval, misfire=misfire, grace=_grace(grace))


def cron(expr: str, tz: str | ZoneInfo = "UTC", misfire: Misfire = "skip",
         grace: timedelta | float | None = None) -> Schedule:
    """A schedule that ticks when the cron expression ``expr`` matches the time in ``tz``."""
    if not isinstance(expr, str):
        raise TypeError(f"a cron expression is a str, not {type(expr).__name__}")
    return Schedule("cron", expr=expr, tz=_zone(tz), misfire=misfire, grace=_grace(grace))


def tick_name(cls_name: str, method: str, tick: datetime) -> str:
    """The run name of ``cls_name.method``'s tick at ``tick``:
    ``Reports.nightly:20261205T013000Z`` (UTC, whole seconds)."""
    _aware(tick, "tick")
    if tick.microsecond:
        raise ValueError(f"tick {tick.isoformat()} is not a whole second; ticks always are")
    if not cls_name or not method or "." in method or ":" in method:
        raise ValueError(f"{cls_name!r}, {method!r}: a tick run name needs a class name and a method "
                         "name without '.' or ':'")
    name = f"{cls_name}.{method}:{tick.astimezone(timezone.utc).strftime(STAMP)}"
    return check_name(name, "tick run name")


def parse_tick(run_name: str) -> datetime | None:
    """The tick (aware UTC) that ``run_name`` is the run of, or None when
    ``run_name`` is not a tick run name."""
    match = TICK_RE.match(run_name) if isinstance(run_name, str) else None
    if match is None:
        return None
    try:
        return datetime.strptime(match["stamp"], STAMP).replace(tzinfo=timezone.utc)
    except ValueError:  # 8 + 6 digits that are no date and time: 20261399T...
        return None


def _check_interval(interval: timedelta | None) -> None:
    if not isinstance(interval, timedelta):
        raise ValueError("every() needs an interval: every(seconds=5), every(minutes=1), "
                         "or every(interval=timedelta(...))")
    if interval < SECOND or interval % SECOND:
        raise ValueError(f"every() interval {interval} must be a whole number of seconds, at least 1 s "
                         "(a tick's run name carries whole seconds)")


def _check_expr(expr: str, tz: tzinfo) -> None:
    try:
        first = next(iter(CronSim(expr, CHECK_FROM.replace(tzinfo=tz))), None)
    except CronSimError as e:
        raise ValueError(f"cron expression {expr!r} is not valid ({e}): use 5 fields, "
                         "'minute hour day-of-month month day-of-week', e.g. '30 2 * * *'") from None
    if first is None:
        raise ValueError(f"cron expression {expr!r} never matches (no tick in 50 years): check its day fields")


def _zone(tz: str | ZoneInfo) -> ZoneInfo:
    if isinstance(tz, ZoneInfo):
        return tz
    if not isinstance(tz, str):
        raise TypeError(f"tz is a time zone name such as 'Europe/Berlin', not {type(tz).__name__}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r}: use an IANA name such as 'UTC' or 'Europe/Berlin' "
                         "(where the system has no zone database, pip install tzdata)") from None


def _grace(grace: timedelta | float | None) -> timedelta | None:
    """``grace`` as a timedelta (a number is seconds), checked."""
    if grace is None:
        return None
    if isinstance(grace, bool) or not isinstance(grace, (int, float, timedelta)):
        raise TypeError(f"grace is a timedelta or seconds, not {type(grace).__name__}")
    delta = grace if isinstance(grace, timedelta) else timedelta(seconds=grace)
    if delta < timedelta(0):
        raise ValueError(f"grace {delta.total_seconds()} s is negative: give 0 or more seconds, or None for "
                         "the tick's period clamped to [1 s, 1 h]")
    return delta


def _aware(t: datetime, what: str) -> None:
    if not isinstance(t, datetime) or t.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (e.g. datetime.now(timezone.utc)), not {t!r}")


def _index(t: datetime, interval: timedelta) -> int:
    """The number of the newest tick at or before ``t`` (0 at the epoch)."""
    return (t - EPOCH) // interval


def _at(k: int, interval: timedelta) -> datetime:
    return EPOCH + k * interval
