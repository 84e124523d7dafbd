"""The schedules declared on Runner classes (``packmule.every``, ``packmule.cron``),
checked and gathered when each class is defined, and ``current_tick``.

A schedule belongs to the class that declares it, under the key
``<Class>.<method>`` (the class's ``__qualname__``): the prefix of its ticks'
run names (``Reports.nightly:20261205T013000Z``) and of its records in the
backend's ledger.  A subclass does not inherit it (it would fire twice); it
declares its own.  A class defined again under the same key (a module
reloaded) replaces the one before.
"""

from __future__ import annotations

import inspect
from datetime import datetime, timezone
from typing import Any

from packmule._model.job import current
from packmule._model.methods import refusal
from packmule._model.schedule import Schedule, parse_tick, tick_name
from packmule._model.timing import check_priority

__all__ = ["DECLARED", "current_tick", "declare"]

#: ``<Class>.<method>`` -> (the class, its schedule), for every class defined so far
DECLARED: dict[str, tuple[type, Schedule]] = {}

_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def declare(cls: type) -> None:
    """Check a Runner class as it is defined (ValueError naming the cause): its
    ``priority``, and each schedule it declares, on a method (``@every``...) or
    by name in its ``schedules`` mapping; then note its schedules."""
    check_priority(getattr(cls, "priority", 0), f"{cls.__qualname__}.priority")
    found: dict[str, Schedule] = {}
    for name, value in vars(cls).items():
        schedule = getattr(value, "__packmule_schedule__", None)
        if isinstance(schedule, Schedule):
            found[name] = schedule
    named = vars(cls).get("schedules")
    if named is not None:
        if not isinstance(named, dict):
            raise ValueError(f"{cls.__qualname__}.schedules must be a dict of method name -> packmule.every(...) "
                             f"or packmule.cron(...), not {type(named).__name__}")
        for name, schedule in named.items():
            if not isinstance(schedule, Schedule):
                raise ValueError(f"{cls.__qualname__}.schedules[{name!r}] must be packmule.every(...) or "
                                 f"packmule.cron(...), not {schedule!r}")
            if name in found:
                raise ValueError(f"{cls.__qualname__}.{name} has two schedules (a decorator and an entry of "
                                 "schedules): keep one")
            found[name] = schedule
    for name, schedule in found.items():
        _check(cls, name)
        DECLARED[f"{cls.__qualname__}.{name}"] = (cls, schedule.bound(name))


def _check(cls: type, name: str) -> None:
    why = refusal(cls, name)
    if why is not None:
        raise ValueError(f"the schedule of {cls.__qualname__}.{name} names no job method: {why}")
    try:
        inspect.signature(getattr(cls, name)).bind(None)
    except TypeError:
        raise ValueError(f"{cls.__qualname__}.{name} is scheduled, so it takes no arguments besides self "
                         "(packmule.current_tick() gives its tick); give the others defaults") from None
    tick_name(cls.__qualname__, name, _EPOCH)  # (refuses a class or method name no run name can carry)


def current_tick() -> datetime | None:
    """Inside the job of a schedule's tick: the tick, an aware UTC datetime.
    Anywhere else (outside a job, in a job of another run, in a method started
    by hand): None."""
    ctx: Any = current.get()
    return parse_tick(ctx.task.name) if ctx is not None else None
