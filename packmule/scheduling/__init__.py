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
from typing import Any

from packmule._core.errors import BackendUnavailable
from packmule._driver.run_state import RunExists
from packmule._model.schedule import Schedule, due, tick_name
from packmule._model.scheduled import DECLARED
from packmule.backends.base import Backend, Registers

__all__ = ["LEASE", "Scheduler", "SchedulerStats", "publish", "published", "totals"]

log = logging.getLogger("packmule")

LEASE = 10.0  # s a claimed tick's claimer has to queue it before another process takes it over
POLL = 0.25  # s at most between a scheduler's passes (it wakes at the next tick if that is sooner)
RECHECK = 64  # newest ticks after `last` whose claims a pass looks at (a claimer that died leaves one)
CLAIM_TTL = 8 * 24 * 3600.0  # s a claim is kept (ticks older than `last` are never considered again)
LAST_TTL = 0.0  # the ledger's longest (re-written at every tick)
PUBLISH_EVERY = 5.0  # s between a scheduler's notes of its schedules in the store (for the dashboard)
FORGET_AFTER = 3600.0  # s after which a schedule no scheduler has noted leaves the dashboard
INDEX_KEY = "pm-sched:index"


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
        self._published_at = -PUBLISH_EVERY
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
        """One look at every schedule: fire what is due (and now and then say
        what this process schedules, for the dashboard: ``publish``)."""
        for key, (cls, schedule) in self.schedules.items():
            self._pass_one(key, cls, schedule, self.clock())
        if time.monotonic() >= self._published_at + PUBLISH_EVERY:
            self._published_at = time.monotonic()
            with contextlib.suppress(BackendUnavailable):
                publish(self.backend, self.schedules)

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
        """Queue the tick's root job in its own run; False if that run exists
        already, with its job counted.  A run that exists with nothing counted
        was made by an earlier attempt whose put failed (its job taken back:
        should the put have queued it after all, it finds its value taken and
        does not run): it is forgotten and made afresh."""
        assert schedule.method is not None
        name = tick_name(cls.__qualname__, schedule.method, tick)
        for attempt in range(2):
            runner: Any = cls(name)  # (a scheduled class is built with its run name alone)
            runner._pm_init(self.backend)
            runner._pm_fresh_only = True
            try:
                runner.enqueue(schedule.method)
            except RunExists:
                if attempt or runner.update_progress().total:
                    log.info("schedule %s: the run %s was queued already", key, name)
                    return False
                log.warning("schedule %s: the run %s holds no job (an earlier put failed): queueing it afresh",
                            key, name)
                runner.forget()
                continue
            log.info("schedule %s: queued %s", key, name)
            self.queued.append(name)
            return True
        return False


def _describe(schedule: Schedule) -> str:
    if schedule.interval is not None:
        return f"every {int(schedule.interval.total_seconds())}s"
    return f"cron {schedule.expr} ({schedule.tz})"


def publish(backend: Backend, schedules: Mapping[str, tuple[type, Schedule]]) -> None:
    """Note in the store what this process schedules: ``INDEX_KEY`` holds a JSON
    object {key: {kind, misfire, seen}} that every scheduler merges its own into
    (a race loses a note until the next, ``PUBLISH_EVERY`` s later), so that a
    dashboard, which imports no user code, can list the schedules."""
    import json

    now = time.time()
    raw = backend.store.get_many([INDEX_KEY]).get(INDEX_KEY)
    index: dict[str, Any] = json.loads(raw) if raw else {}
    index = {key: entry for key, entry in index.items() if now - entry.get("seen", 0) < FORGET_AFTER}
    for key, (cls, schedule) in schedules.items():
        index[key] = {"class": cls.__qualname__, "method": schedule.method, "kind": _describe(schedule),
                      "misfire": schedule.misfire, "seen": now, "spec": _spec(schedule)}
    backend.store.set_many({INDEX_KEY: json.dumps(index, sort_keys=True).encode()}, FORGET_AFTER)


def _spec(schedule: Schedule) -> dict[str, Any]:
    if schedule.interval is not None:
        return {"every": schedule.interval.total_seconds()}
    return {"cron": schedule.expr, "tz": str(schedule.tz)}


def published(backend: Backend) -> list[dict[str, Any]]:
    """The schedules the schedulers of ``backend`` noted (``publish``), each with its
    next fire time, its last tick, that run's progress, and its totals."""
    import json

    from packmule._driver.runner import Runner
    from packmule._model.schedule import cron, every

    raw = backend.store.get_many([INDEX_KEY]).get(INDEX_KEY)
    index: dict[str, Any] = json.loads(raw) if raw else {}
    counted = totals(backend, list(index))
    ledger, now, out = ledger_of(backend), datetime.now(timezone.utc), []
    for key, entry in sorted(index.items()):
        spec = entry["spec"]
        schedule = every(seconds=spec["every"]) if "every" in spec else cron(spec["cron"], tz=spec["tz"])
        raw_last = ledger.read(last_key(key))[0]
        last = _when(raw_last) if raw_last is not None else None
        run = tick_name(entry["class"], entry["method"], last) if last is not None else None
        state = ""
        if run is not None:
            reader = Runner(run, backend=backend)
            state = str(reader.update_progress()) if reader._gen() is not None else "not fired"
        out.append({"key": key, "kind": entry["kind"], "misfire": entry["misfire"],
                    "next": schedule.next_after(now).isoformat(), "last_tick": last.isoformat() if last else None,
                    "last_run": run, "state": state, **counted[key]})
    return out
