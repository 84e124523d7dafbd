"""What the job path writes for a dashboard: a bounded registry of recent runs
and of live workers, and totals from every worker - kept in the backend's
store, since a store such as memcached cannot list its keys.  (What a dashboard
reads of it is ``packmule._driver.watcher``'s.)

Keys::

    pm-reg:rseq          counter: runs registered so far
    pm-reg:r:<k % 1024>  the k-th run: JSON {k, name, gen, t}; the ring keeps the last 1024
    pm-reg:wseq          counter: worker processes registered so far
    pm-reg:ws:<k % 1024> the id of the k-th worker (a live worker takes a new slot if its is reused)
    pm-reg:w:<id>        a worker's beat: JSON WorkerInfo, expiring 3 beats after it was written
    pm-stats:<figure>    totals from every worker: done, failed, retried, dur:<i> (jobs that
                         took at most BUCKETS[i] seconds), dur_us (sum), dur_n (count)
    P t                  "<time> <k>": when the run's generation started, and its number in the
                         ring (``P`` = the run's prefix; ``forget`` removes its slot too)

Cost: a run start adds one counter increment and two writes; a job adds a few
in-process additions; each worker process writes its beat and its totals every
BEAT seconds from a thread of its own.  ``PACKMULE_REGISTRY=0`` turns the beats
and totals off (the benchmarks compare both); runs are registered either way.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import random
import socket
import threading
import time
from typing import Any

from packmule._core.config import POOL_VAR
from packmule.backends.base import Backend, Store

__all__ = ["BEAT", "BEAT_TTL", "BUCKETS", "ENABLED", "POOL_VAR", "RUN_SLOTS", "STATS", "STAT_KEYS", "WORKER_SLOTS",
           "Beat", "Stats", "note_run", "slot_of"]

ENABLED = os.environ.get("PACKMULE_REGISTRY", "1") != "0"
RUN_SLOTS = 1024
WORKER_SLOTS = 1024  # worker processes the dashboard lists at once (more share slots and flicker)
BEAT = 2.0  # s between a worker's beats
PRUNE_EVERY = 3600.0  # s (about) between a worker process's prunes of expired registers (run names, ledger)
BEAT_TTL = 3 * BEAT  # a worker that stops beating leaves the registry after this long
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, float("inf"))
DUR_KEYS = tuple(f"dur:{i}" for i in range(len(BUCKETS)))
STAT_KEYS = ("done", "failed", "retried", "dur_us", "dur_n", *DUR_KEYS)


# --- runs: written by the driver that starts a generation ----------------------------
def note_run(store: Store, name: str, gen: str, prefix: str, ttl: float) -> None:
    """Register a run's new generation (called once, by the process whose start won)."""
    now = time.time()
    k = _incr(store, "pm-reg:rseq")
    store.set_many({prefix + "t": b"%.3f %d" % (now, k or 0)}, ttl)  # (forget finds the slot by k)
    if k is not None:
        entry = json.dumps({"k": k, "name": name, "gen": gen, "t": now}).encode()
        store.set_many({f"pm-reg:r:{k % RUN_SLOTS}": entry}, ttl)


def slot_of(store: Store, name: str, gen: str, prefix: str) -> list[str]:
    """The registry slot that lists this generation, if it still does (for ``forget``)."""
    raw = store.get_many([prefix + "t"]).get(prefix + "t")
    if raw is None or b" " not in raw:
        return []
    slot = f"pm-reg:r:{int(raw.split()[1]) % RUN_SLOTS}"
    entry = store.get_many([slot]).get(slot)
    if entry is None:
        return []
    listed = json.loads(entry)
    return [slot] if (listed["name"], listed["gen"]) == (name, gen) else []


def _incr(store: Store, key: str, delta: int = 1) -> int | None:
    got = store.incr_many({key: delta}).get(key)
    if got is None:  # first use (or the store restarted)
        store.add_many({key: 0}, 0)
        got = store.incr_many({key: delta}).get(key)
    return None if got is None else int(got)


# --- workers: what this process did, published by its beat --------------------------
class Stats:
    """This worker process's figures; the engine adds to them, the beat publishes."""

    def __init__(self) -> None:
        self.jobs_run = 0
        self.current: Any = None  # the task running now (a packmule._transport.wire.Task)
        # seconds each job took, appended by the engine (one append a job) and
        # binned by ``tally`` (in the beat's thread: a job pays no more than that)
        self.durations: list[float] = []
        self.totals: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._tally = threading.Lock()  # (the beat and, when no beat keeps up, the engine tally)

    def tally(self) -> None:
        """Move the durations appended so far into the totals.  (``len``, a slice and
        ``del`` of a slice are each atomic: an append made meanwhile stays for the next.)"""
        with self._tally:
            d = self.durations
            n = len(d)
            if not n:
                return
            taken = d[:n]
            del d[:n]
            t = self.totals
            for seconds in taken:
                t[DUR_KEYS[bisect.bisect_left(BUCKETS, seconds)]] += 1
            t["dur_us"] += int(sum(taken) * 1e6)
            t["dur_n"] += n
            self.jobs_run += n

    def counted(self, key: str, delta: int) -> None:
        self.totals[key] += delta

    def running(self) -> list[str]:
        """The job ids running now (from the beat's thread: one read of ``current``)."""
        task = self.current
        return [] if task is None else [f"{task.name}/{task.gen}/{task.path}"]


STATS = Stats()


class Beat:
    """A worker process's beat: every BEAT seconds, its record (expiring after
    three beats) and the totals it added since the last beat."""

    def __init__(self, backend: Backend, stats: Stats = STATS) -> None:
        self.worker_backend, self.stats = backend, stats
        self.backend: Backend = backend  # the beat thread's (``for_thread``), once it runs
        self.started = time.time()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{int(self.started * 1000) % 10**9}"
        self.slot: str | None = None
        self.sent: dict[str, int] = dict(stats.totals)  # (totals of earlier beats of this process are published)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="packmule-beat")

    def start(self) -> Beat:
        if ENABLED:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating, publish the last totals, and leave the registry."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(BEAT + 5)
        with contextlib.suppress(Exception):
            self._publish_totals()
            self.backend.store.delete_many([f"pm-reg:w:{self.id}"])
        if self.backend is not self.worker_backend:
            with contextlib.suppress(Exception):
                self.backend.close()

    def _run(self) -> None:
        while True:
            try:
                self.backend = self.worker_backend.for_thread()
                break
            except Exception:  # servers away: try again at the next beat
                if self._stop.wait(BEAT):
                    return
        prune_at = time.monotonic() + random.uniform(0.1, 1.0) * PRUNE_EVERY
        while True:
            with contextlib.suppress(Exception):  # servers away: the next beat tries again
                self.beat()
            if time.monotonic() >= prune_at:
                prune_at = time.monotonic() + random.uniform(0.5, 1.5) * PRUNE_EVERY
                self.prune()
            if self._stop.wait(BEAT):
                return

    def prune(self) -> None:
        """Delete the backend's expired registers: its run-name pointers' and its ledger's."""
        for registers in (self.backend.registers, self.backend.ledger):
            if registers is not None:
                with contextlib.suppress(Exception):  # (the next prune tries again)
                    registers.prune()

    def beat(self) -> None:
        store = self.backend.store
        if self.slot is None or store.get_many([self.slot]).get(self.slot) != self.id.encode():
            k = _incr(store, "pm-reg:wseq")
            if k is not None:
                self.slot = f"pm-reg:ws:{k % WORKER_SLOTS}"
                store.set_many({self.slot: self.id.encode()}, 0)
        record = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "backend": self.backend.name,
                  "concurrency": int(os.environ.get(POOL_VAR, "1")), "jobs_run": self.stats.jobs_run,
                  "running": self.stats.running(), "rss": _rss(), "started_at": self.started,
                  "last_seen": time.time()}
        store.set_many({f"pm-reg:w:{self.id}": json.dumps(record).encode()}, BEAT_TTL)
        self._publish_totals()

    def _publish_totals(self) -> None:
        self.stats.tally()
        now = dict(self.stats.totals)
        deltas = {f"pm-stats:{k}": v - self.sent[k] for k, v in now.items() if v != self.sent[k]}
        if not deltas:
            return
        store = self.backend.store
        got = store.incr_many(deltas)
        missing = [k for k, v in got.items() if v is None]
        if missing:  # first use, or the store restarted
            store.add_many(dict.fromkeys(missing, 0), 0)
            store.incr_many({k: deltas[k] for k in missing})
        self.sent = now


def _rss() -> int:
    """This process's resident set, in bytes (0 if it cannot be read)."""
    try:  # (Linux: what psutil reads too, without importing psutil, about 1.5 MiB, into every worker process)
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil  # (here: elsewhere than Linux, and only when a worker beats)

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0
