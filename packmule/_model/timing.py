"""When and in what order a job runs: ``delay=``, ``at=`` and ``priority=`` of
``enqueue``, ``enqueue_each`` and ``enqueue_call``, checked at the call.

A job carries its priority and its *due* time (Unix seconds; 0: now) in its
bundle's header (``packmule._transport.wire``); the queue holds it until then
(beanstalkd's delay, the local coordinator's delayed heap), never a worker's
memory (but for the fraction of a second a queue of whole seconds may give it
out early: ``hold_until_due``, called by the worker before a batch, holds it until
its time).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Iterable

from packmule.backends.base import PRIORITIES

__all__ = ["MAX_HOLD", "check_priority", "due_time", "hold_until_due"]

MAX_HOLD = 1.0  # s at most that a job given out before its time is held (Put: whole seconds, rounded down)


def check_priority(priority: object, where: str = "priority") -> int:
    """``priority`` if it is an int in ``PRIORITIES``; else ValueError naming the range."""
    if isinstance(priority, bool) or not isinstance(priority, int) or priority not in PRIORITIES:
        raise ValueError(f"{where} must be an int from {PRIORITIES.start} to {PRIORITIES.stop - 1} (higher runs "
                         f"first), not {priority!r}")
    return priority


def due_time(delay: object, at: object, limit: float, why_limit: str) -> float:
    """The Unix time a job is due (0.0: at once) from ``delay`` (seconds or a
    ``timedelta``) or ``at`` (an aware ``datetime``; one in the past: at once).
    Refused with ValueError: both given, a negative or non-finite delay, a naive
    datetime, or a wait past ``limit`` seconds (``why_limit`` says whose)."""
    if delay is None and at is None:
        return 0.0
    if delay is not None and at is not None:
        raise ValueError("give delay= or at=, not both")
    now = time.time()
    if at is not None:
        if not isinstance(at, _dt.datetime):
            raise ValueError(f"at= takes an aware datetime, not {type(at).__name__}: {at!r}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"at={at!r} is naive: give it a time zone (for example "
                             "datetime.now(timezone.utc) + timedelta(minutes=5)), or pass delay= in seconds")
        due = at.timestamp()
        seconds = due - now
    else:
        if isinstance(delay, _dt.timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
            seconds = float(delay)
        else:
            raise ValueError(f"delay= takes seconds (an int or a float) or a timedelta, not {delay!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay={delay!r}: give a finite number of seconds >= 0")
        due = now + seconds
    if seconds > limit:
        raise ValueError(f"a job cannot wait {seconds:,.0f}s: {why_limit} is {limit:,.0f}s; run it later from "
                         "a schedule (packmule.every, packmule.cron) instead")
    return due if seconds > 0 else 0.0


def hold_until_due(dues: Iterable[float]) -> None:
    """In a worker, before it runs a batch: a delayed job that a queue of whole
    seconds gave out early (by under a second) is held until its time, at most
    ``MAX_HOLD`` seconds (a clock ahead of the driver's holds it no longer)."""
    early = max(dues, default=0.0) - time.time()
    if early > 0:
        time.sleep(min(early, MAX_HOLD))
