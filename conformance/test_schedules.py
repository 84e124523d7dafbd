"""Periodic schedules fire exactly once per tick, on every backend: with three
scheduler processes, while one is SIGKILLed and another SIGSTOPped past its
lease; after a crash between a tick's claim and its queueing, or between its
queueing and its record; after downtime, as each misfire policy says; and
across DST in both directions.  Ticks are counted from what their jobs did
(``scheduled.py``: each notes its tick in a file), never from the scheduler's
own word.  The tests with a controlled clock run a scheduler in this process;
its ledger and its queue are the backend's own."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from packmule.backends.base import Backend

from packmule._model.schedule import tick_name
from packmule._model.scheduled import DECLARED
from packmule.scheduling import Scheduler, claim_key, last_key

from .harness import Harness, environ_for
from .scheduled import Beat, ticks_file
from .scheduled_more import Berlin, Crashy, Misfires, NewYork

WAIT = 60.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ticks(key: str) -> collections.Counter[str]:
    try:
        with open(ticks_file(key)) as f:
            return collections.Counter(line.split()[0] for line in f if line.strip())
    except FileNotFoundError:
        return collections.Counter()


def _clear(*keys: str) -> None:
    for key in keys:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ticks_file(key))


def _only(*keys: str) -> dict[str, Any]:
    return {key: DECLARED[key] for key in keys}


class Clock:
    """A clock the test moves."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def _base(offset_days: int) -> datetime:
    """A start time of a day of the test's own (its ticks' runs are new runs)."""
    return datetime(2031, 1, 1, tzinfo=timezone.utc) + timedelta(days=offset_days)


def _reset(harness: Harness, *keys: str) -> None:
    """Forget the schedules' last ticks (an earlier test's clock left them elsewhere)."""
    ledger = harness.backend.ledger
    assert ledger is not None, f"the {harness.backend.name} backend has no ledger: it cannot run schedules"
    for key in keys:
        raw, token = ledger.read(last_key(key))
        if raw is not None:
            assert ledger.swap(last_key(key), token, None, 0)
    _clear(*keys)


def _wait_runs(harness: Harness, cls: type, names: list[str]) -> None:
    for name in names:
        runner = cls(name, backend=harness.backend)
        assert runner.wait(timeout=WAIT) == "1.0 / 1.0", name


# --- misfire policies --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("policy", "fired_after_gap"), [("skip", 1), ("latest", 1), ("all", 6)])
def test_after_five_ticks_of_downtime_each_misfire_policy_fires_what_it_says(
        harness: Harness, policy: str, fired_after_gap: int) -> None:
    key = f"Misfires.{policy}"
    _reset(harness, key)
    clock = Clock(_base(0) + timedelta(milliseconds=300))
    scheduler = Scheduler(harness.backend, _only(key), clock=clock)
    # Given a schedule that ran for 3 ticks
    scheduler.run_pass()  # (first sight: it starts from the next tick)
    for _ in range(3):
        clock.now += timedelta(seconds=1)
        scheduler.run_pass()
    assert len(scheduler.queued) == 3
    # When every scheduler is down for 5 ticks, and one comes back at the 6th
    clock.now += timedelta(seconds=6)
    again = Scheduler(harness.backend, _only(key), clock=clock)
    again.run_pass()
    again.run_pass()
    # Then the ticks missed fire as the policy says: skip, only the one on time; latest, the newest; all, each
    assert len(again.queued) == fired_after_gap
    newest = tick_name("Misfires", policy, clock.now.replace(microsecond=0))
    assert again.queued[-1] == newest
    _wait_runs(harness, Misfires, scheduler.queued + again.queued)
    assert all(n == 1 for n in _ticks(key).values()) and sum(_ticks(key).values()) == 3 + fired_after_gap


# --- crashes between a scheduler's steps ---------------------------------------------------------------------
class _Crash(BaseException):
    pass


class CrashBeforeQueue(Scheduler):
    def _queue(self, *args: Any) -> bool:
        raise _Crash("died after the claim, before the job was queued")


class CrashBeforeRecord(Scheduler):
    def _queue(self, *args: Any) -> bool:
        super()._queue(*args)
        raise _Crash("died after the job was queued, before the claim was marked queued")


@pytest.mark.parametrize("crashing", [CrashBeforeQueue, CrashBeforeRecord])
def test_a_scheduler_that_dies_inside_a_tick_leaves_it_to_another_and_it_fires_once(
        harness: Harness, crashing: type[Scheduler]) -> None:
    key = "Crashy.tick"
    _reset(harness, key)
    offset = 1 if crashing is CrashBeforeQueue else 2
    clock = Clock(_base(offset) + timedelta(milliseconds=500))
    first = crashing(harness.backend, _only(key), clock=clock, lease=1.0)
    first.run_pass()  # (first sight)
    clock.now += timedelta(seconds=1)
    tick = clock.now.replace(microsecond=0)
    with pytest.raises(_Crash):
        first.run_pass()
    # Then another scheduler leaves the claim alone within its lease, and takes it over after
    other = Scheduler(harness.backend, _only(key), clock=clock, lease=1.0)
    other.run_pass()
    raw = harness.backend.ledger.read(claim_key(key, tick))[0]  # type: ignore[union-attr]
    assert raw is not None and raw.startswith(b"claimed " + first.owner.encode())
    time.sleep(1.2)
    other.run_pass()
    raw = harness.backend.ledger.read(claim_key(key, tick))[0]  # type: ignore[union-attr]
    assert raw is not None and raw.startswith(b"queued " + other.owner.encode())
    name = tick_name("Crashy", "tick", tick)
    _wait_runs(harness, Crashy, [name])
    # and the tick ran once: queued by the one that took over, or found queued by it
    assert _ticks(key) == {f"{tick:%Y%m%dT%H%M%SZ}": 1}
    assert other.queued == ([name] if crashing is CrashBeforeQueue else [])
    # and the next tick fires as usual
    clock.now += timedelta(seconds=1)
    other.run_pass()
    assert len(other.queued) == (2 if crashing is CrashBeforeQueue else 1)
    # (and runs: nothing of this test's is left to note a tick during the next test)
    _wait_runs(harness, Crashy, [other.queued[-1]])


# --- DST -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "day", "hourly", "daily"), [
    (Berlin, datetime(2026, 3, 29), 23, 1), (Berlin, datetime(2026, 10, 25), 25, 1),
    (NewYork, datetime(2026, 3, 8), 23, 1), (NewYork, datetime(2026, 11, 1), 25, 1)],
    ids=["Berlin-spring", "Berlin-fall", "NewYork-spring", "NewYork-fall"])
def test_across_a_dst_change_hourly_and_daily_schedules_fire_the_documented_number_of_times(
        harness: Harness, cls: type, day: datetime, hourly: int, daily: int) -> None:
    name = cls.__qualname__
    keys = (f"{name}.hourly", f"{name}.daily")
    _reset(harness, *keys)

    zone = ZoneInfo("Europe/Berlin" if cls is Berlin else "America/New_York")
    start = day.replace(tzinfo=zone).astimezone(timezone.utc)
    end = (day + timedelta(days=1)).replace(tzinfo=zone).astimezone(timezone.utc)
    clock = Clock(start - timedelta(seconds=1))
    scheduler = Scheduler(harness.backend, _only(*keys), clock=clock)
    scheduler.run_pass()  # (first sight, just before the day's first local midnight)
    while clock.now < end - timedelta(seconds=1):
        clock.now = min(clock.now + timedelta(minutes=10), end - timedelta(seconds=1))
        scheduler.run_pass()
    counts = collections.Counter(run.split(":")[0] for run in scheduler.queued)
    assert counts == {keys[0]: hourly, keys[1]: daily}
    assert len(set(scheduler.queued)) == len(scheduler.queued)
    _wait_runs(harness, cls, scheduler.queued)
    assert sum(_ticks(keys[0]).values()) == hourly and sum(_ticks(keys[1]).values()) == daily


# --- three scheduler processes, one killed, one stopped ---------------------------------------------------------
@contextlib.contextmanager
def _schedulers(harness: Harness, n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` processes that fire the schedules of ``scheduled.py``: ``packmule
    worker``s (which run the scheduler too) on a cluster backend, ``packmule
    scheduler``s joined to it on a backend that lives in this process."""
    env = environ_for(harness)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # (a backend that starts its own workers lives in this process: they join it)
    joins = type(harness.backend).ensure_workers is not Backend.ensure_workers
    command = ["scheduler"] if joins else ["worker", "--concurrency", "1"]
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "packmule", *command, "--import", Beat.__module__],
                                env=env, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    for _ in range(n):
        start()
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _firer(harness: Harness, tick: str) -> int | None:
    """The pid of the scheduler that queued the tick ``tick`` (from its claim)."""
    when = datetime.strptime(tick, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    raw = harness.backend.ledger.read(claim_key("Beat.beat", when))[0]  # type: ignore[union-attr]
    return int(raw.split()[1].split(b":")[1]) if raw is not None else None


def test_three_schedulers_fire_every_tick_exactly_once_while_one_is_killed_and_one_stalls(
        harness: Harness) -> None:
    _reset(harness, "Beat.beat")
    with _schedulers(harness, 3) as procs:
        deadline = time.monotonic() + 30
        time.sleep(10)
        # the one that fired the newest tick is SIGKILLed
        newest = max(_ticks("Beat.beat"))
        killed = _firer(harness, newest)
        assert killed in [p.pid for p in procs]
        os.kill(killed, signal.SIGKILL)  # type: ignore[arg-type]
        time.sleep(7)
        # the one that fired the newest tick then is SIGSTOPped past its lease and its session, then resumed
        stalled = _firer(harness, max(_ticks("Beat.beat")))
        assert stalled in [p.pid for p in procs] and stalled != killed
        os.kill(stalled, signal.SIGSTOP)  # type: ignore[arg-type]
        time.sleep(11)
        os.kill(stalled, signal.SIGCONT)  # type: ignore[arg-type]
        time.sleep(max(0.0, deadline - time.monotonic()))
    # (the jobs of the last ticks queued may still be running: wait until the ticks noted stop changing)
    seen, settle = _ticks("Beat.beat"), time.monotonic() + WAIT
    while time.monotonic() < settle:
        time.sleep(1.5)
        now = _ticks("Beat.beat")
        if now == seen:
            break
        seen = now
    ticks = _ticks("Beat.beat")
    # every tick from the first fired to the last fired ran once: none twice, none missed
    assert ticks and max(ticks.values()) == 1, [t for t, n in ticks.items() if n > 1]
    first, last = (datetime.strptime(t, "%Y%m%dT%H%M%SZ") for t in (min(ticks), max(ticks)))
    expected = int((last - first).total_seconds()) + 1
    assert len(ticks) == expected and expected >= 25
