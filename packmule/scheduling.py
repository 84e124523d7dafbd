"""The scheduler: fires every declared schedule (``packmule._model.scheduled``)
exactly once per tick, whatever the number of processes that run it.

Every scheduler process does the same, with no leader:

1. It reads the schedule's *last* record in the backend's ledger (durable
   registers: ZooKeeper on a cluster, the coordinator on ``local``): the newest
   tick settled.  None yet: it records the newest tick up to now, and fires
   nothing (a new schedule starts from its next tick).
2. The misfire policy decides which ticks after *last* to fire
   (``packmule._model.schedule.due``).
3. Each tick to fire is *claimed* with a create-if-absent of
   ``schedule:<key>:<tick>`` in the ledger: one process wins.  The winner
   queues the tick's root job, in a run named after the tick, made fresh only
   (``RunState.start_or_join``): should the tick be queued twice, the second
   finds its run and queues nothing.  Then it marks the claim *queued*.
4. A claim left *claimed* for ``LEASE`` seconds (its process died, or stopped,
   between the claim and the mark) is taken over, by compare-and-set, by
   another process, which queues the tick (or finds it queued) and marks it.
   *last* never moves past a tick claimed and not yet queued, so such a tick
   is fired whatever the misfire policy says of ticks that old.
5. *last* moves forward by compare-and-set.

So a tick fires once however many processes race, crash or stall, and a
restart of every process neither forgets ticks nor repeats them: what was
fired is in the ledger, never only in a process's memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

from packmule._core.errors import BackendUnavailable
from packmule._driver.run_state import RunExists
from packmule._model.schedule import Schedule, due, tick_name
from packmule._model.scheduled import DECLARED
from packmule.backends.base import Backend, Registers

__all__ = ["LEASE", "Scheduler", "SchedulerStats", "ScheduleView", "schedules_view"]

log = logging.getLogger("packmule")

LEASE = 10.0  # s a claimed tick's claimer has to queue it before another process takes it over
POLL = 0.25  # s at most between a scheduler's passes (it wakes at the next tick if that is sooner)
RECHECK = 64  # newest ticks after `last` whose claims a pass looks at (a claimer that died leaves one)
CLAIM_TTL = 8 * 24 * 3600.0  # s a claim is kept (ticks older than `last` are never considered again)
LAST_TTL = 0.0  # the ledger's longest (re-written at every tick)


class SchedulerStats:
    """What this process's schedulers did: ticks fired, skipped (misfire), late."""

    def __init__(self) -> None:
        self.fired = self.skipped = self.late = 0


STATS = SchedulerStats()


def _stamp(t: datetime) -> bytes:
    return str(int(t.timestamp())).encode()


def _when(raw: bytes) -> datetime:
    return datetime.fromtimestamp(int(raw), timezone.utc)


def last_key(key: str) -> str:
    return f"schedule:{key}:last"


def claim_key(key: str, tick: datetime) -> str:
    return f"schedule:{key}:{tick.strftime('%Y%m%dT%H%M%SZ')}"


def total_key(key: str, kind: str) -> str:
    return f"pm-sched:{kind}:{key}"


def totals(backend: Backend, keys: list[str]) -> dict[str, dict[str, int]]:
    """Each schedule's totals in the backend: {key: {'fired': n, 'skipped': n, 'late': n}}."""
    names = {total_key(key, kind): (key, kind) for key in keys for kind in ("fired", "skipped", "late")}
    got = backend.store.get_many(list(names))
    out: dict[str, dict[str, int]] = {key: {"fired": 0, "skipped": 0, "late": 0} for key in keys}
    for name, raw in got.items():
        key, kind = names[name]
        out[key][kind] = int(raw)
    return out


def ledger_of(backend: Backend) -> Registers:
    if backend.ledger is None:
        raise ValueError(f"the {backend.name} backend keeps no ledger (Backend.ledger), so it cannot run schedules")
    return backend.ledger


class Scheduler:
    """Fires ``schedules`` (default: every one declared so far) on ``backend``;
    ``clock`` gives the time (an aware datetime; a test passes its own)."""

    def __init__(self, backend: Backend, schedules: Mapping[str, tuple[type, Schedule]] | None = None, *,
                 clock: Callable[[], datetime] | None = None, lease: float = LEASE) -> None:
        self.backend, self.lease = backend, lease
        self.queued: list[str] = []  # the tick runs this scheduler queued, oldest first
        self.ledger = ledger_of(backend)
        self.schedules = dict(DECLARED if schedules is None else schedules)
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._counted: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- running -----------------------------------------------------------------
    def start(self) -> Scheduler:
        """Run in a daemon thread until ``stop``."""
        self._thread = threading.Thread(target=self.serve, daemon=True, name="packmule-scheduler")
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def serve(self) -> None:
        """Pass over the schedules until ``stop``: at every tick, and every POLL s."""
        log.info("scheduler %s: %d schedule(s): %s", self.owner, len(self.schedules), ", ".join(self.schedules))
        while not self._stop.is_set():
            try:
                self.run_pass()
            except BackendUnavailable as exc:
                log.warning("scheduler: %s; trying again", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("scheduler: a pass failed; trying again")
                self._stop.wait(1.0)
            self._stop.wait(self._pause())

    def _pause(self) -> float:
        now = self.clock()
        soonest = min((s.next_after(now) for _, s in self.schedules.values()), default=None)
        return POLL if soonest is None else max(0.0, min(POLL, (soonest - now).total_seconds()))

    def run_pass(self) -> None:
        """One look at every schedule: fire what is due."""
        for key, (cls, schedule) in self.schedules.items():
            self._pass_one(key, cls, schedule, self.clock())

    # --- one schedule ------------------------------------------------------------
    def _pass_one(self, key: str, cls: type, schedule: Schedule, now: datetime) -> None:
        raw, token = self.ledger.read(last_key(key))
        if raw is None:
            start = schedule.latest(now) or now
            self.ledger.swap(last_key(key), None, _stamp(start), LAST_TTL)  # (a racer's record stands as well)
            return
        last = _when(raw)
        plan = due(schedule, last, now)
        fire = set(plan.fire)
        recheck = set(schedule.newest(last, now, RECHECK)[0])
        pending = False
        for tick in sorted(fire | recheck):
            outcome = self._settle(key, cls, schedule, tick, tick in fire, now)
            pending = pending or outcome == "pending"
        if not pending and plan.new_last > last and self.ledger.swap(last_key(key), token, _stamp(plan.new_last),
                                                                     LAST_TTL):
            self._count(key, skipped=plan.skipped)

    def _settle(self, key: str, cls: type, schedule: Schedule, tick: datetime, fire: bool, now: datetime) -> str:
        """Claim and queue one tick, or finish another's claim: 'done', 'pending'
        (another process holds its claim, within its lease) or 'passed' (not to
        fire, and nobody claimed it)."""
        name = claim_key(key, tick)
        raw, token = self.ledger.read(name)
        if raw is None:
            if not fire:
                return "passed"
            if not self.ledger.swap(name, None, self._claim(), CLAIM_TTL):
                return "pending"  # (another process claimed it this instant)
        elif raw.startswith(b"queued "):
            return "done"
        else:
            _, owner, at = raw.decode().split(" ")
            if owner != self.owner and time.time() - float(at) < self.lease:
                return "pending"
            if not self.ledger.swap(name, token, self._claim(), CLAIM_TTL):
                return "pending"
            log.warning("schedule %s: the tick %s claimed by %s was not queued within %.0fs: queueing it here",
                        key, tick.isoformat(), owner, self.lease)
        raw, token = self.ledger.read(name)
        if raw is None or not raw.startswith(b"claimed " + self.owner.encode()):
            return "pending"
        queued = self._queue(key, cls, schedule, tick)
        self.ledger.swap(name, token, b"queued " + self.owner.encode() + b" %.3f" % time.time(), CLAIM_TTL)
        if queued:
            late = now - tick > schedule.grace_of(tick)
            self._count(key, fired=1, late=int(late))
        return "done"

    def _count(self, key: str, **counts: int) -> None:
        """Add to the schedule's totals (fired, skipped, late): this process's,
        and the backend's, which ``/metrics`` reads (best effort: a count lost
        to a store server's death is only a count)."""
        for kind, n in counts.items():
            setattr(STATS, kind, getattr(STATS, kind) + n)
        keys = {total_key(key, kind): n for kind, n in counts.items() if n}
        if not keys:
            return
        try:
            store = self.backend.store
            if keys.keys() - self._counted:
                store.add_many(dict.fromkeys(keys, 0), 0)
                self._counted.update(keys)
            store.incr_many(keys)
        except BackendUnavailable as exc:
            log.debug("schedule totals not counted: %s", exc)

    def _claim(self) -> bytes:
        return f"claimed {self.owner} {time.time():.3f}".encode()

    def _queue(self, key: str, cls: type, schedule: Schedule, tick: datetime) -> bool:
        """Queue the tick's root job in its own run; False if that run exists already."""
        assert schedule.method is not None
        name = tick_name(cls.__qualname__, schedule.method, tick)
        runner: Any = cls(name)  # (a scheduled class is built with its run name alone)
        runner._pm_init(self.backend)
        runner._pm_fresh_only = True
        try:
            runner.enqueue(schedule.method)
        except RunExists:
            log.info("schedule %s: the run %s was queued already", key, name)
            return False
        log.info("schedule %s: queued %s", key, name)
        self.queued.append(name)
        return True


class ScheduleView(NamedTuple):
    """One schedule as ``packmule schedules``, the dashboard and the API show it."""

    key: str
    kind: str  # 'every 5s' | 'cron 30 2 * * * (Europe/Berlin)'
    misfire: str
    next_fire: datetime
    last_tick: datetime | None
    last_run: str | None  # the last tick's run name
    state: str  # that run's progress, or '' (none yet), or why it cannot be read


def schedules_view(backend: Backend, schedules: Mapping[str, tuple[type, Schedule]] | None = None,
                   now: datetime | None = None) -> list[ScheduleView]:
    """Each schedule: its next fire time, its last tick and that run's state."""
    now = now or datetime.now(timezone.utc)
    ledger = ledger_of(backend)
    out = []
    for key, (cls, schedule) in sorted((schedules if schedules is not None else DECLARED).items()):
        assert schedule.method is not None
        kind = (f"every {int(schedule.interval.total_seconds())}s" if schedule.interval is not None
                else f"cron {schedule.expr} ({schedule.tz})")
        raw = ledger.read(last_key(key))[0]
        last = _when(raw) if raw is not None else None
        run, state = None, ""
        if last is not None and last.timestamp() > 0:
            run = tick_name(cls.__qualname__, schedule.method, last)
            try:
                runner: Any = cls(run)
                runner._pm_init(backend)
                state = str(runner.update_progress()) if runner._gen() is not None else "not fired"
            except Exception as exc:
                state = f"unreadable: {exc}"
        out.append(ScheduleView(key, kind, schedule.misfire, schedule.next_after(now), last, run, state))
    return out


# --- the faces: packmule.run_schedules, `packmule scheduler`, `packmule worker`, `packmule schedules` ------------
def run_schedules(backend: Backend | str | None = None) -> Scheduler:
    """Fire, in a daemon thread of this process, every schedule of the Runner
    classes defined so far, until the process ends (or ``.stop()``).  On the
    local backend this is how schedules run: in the program that uses it."""
    from packmule.backends import _choice

    chosen = backend if isinstance(backend, Backend) else _choice.get_backend(backend)
    return Scheduler(chosen).start()


def imported(modules: list[str]) -> dict[str, tuple[type, Schedule]]:
    """Import ``modules`` (``--import``); the schedules declared so far."""
    import importlib

    for module in modules:
        importlib.import_module(module)
    return dict(DECLARED)


def scheduler_main(modules: list[str]) -> int:
    """``packmule scheduler``: fire the schedules of ``modules`` until SIGTERM or SIGINT."""
    import signal

    from packmule.backends import _choice

    declared = imported(modules)
    if not declared:
        log.error("no schedules: none of %s declares one (packmule.every, packmule.cron)", modules or "(no --import)")
        return 2
    scheduler = Scheduler(_choice.get_backend(), declared)
    signal.signal(signal.SIGTERM, lambda *_: scheduler._stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        scheduler.serve()
    return 0


def worker_schedules(modules: list[str]) -> Scheduler | None:
    """What ``packmule worker`` runs beside its worker processes (unless
    ``--no-schedules``): a scheduler of the schedules its ``--import`` modules
    declare, on a cluster backend.  (On ``local`` the backend lives in the program
    that uses it: schedules run there, ``run_schedules``.)"""
    if not modules or (os.environ.get("PACKMULE_BACKEND") or "local") == "local":
        return None
    declared = imported(modules)
    if not declared:
        return None
    from packmule.backends import _choice

    return Scheduler(_choice.get_backend(), declared).start()


def print_schedules(modules: list[str]) -> int:
    """``packmule schedules``: each schedule of ``modules`` with its next fire
    time, its last tick and that run's state."""
    from packmule.backends import _choice

    declared = imported(modules)
    if not declared:
        print("no schedules (give the modules that declare them with --import)")
        return 0
    backend = _choice.get_backend()
    views = schedules_view(backend, declared)
    counted = totals(backend, [v.key for v in views])
    for v in views:
        last = v.last_tick.isoformat() if v.last_tick else "-"
        c = counted[v.key]
        print(f"{v.key}  {v.kind}  misfire={v.misfire}  next {v.next_fire.isoformat()}  last {last}  "
              f"{v.last_run or ''} {v.state}  (fired {c['fired']}, skipped {c['skipped']}, late {c['late']})")
    return 0
