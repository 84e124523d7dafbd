"""What a dashboard reads: a bounded registry of recent runs and of live
workers, and totals from every worker - kept in the backend's store, since a
store such as memcached cannot list its keys.

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
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from packmule._model.keys import job_id, pointer, prefix
from packmule.backends.base import Backend, QueueStats, Store

ENABLED = os.environ.get("PACKMULE_REGISTRY", "1") != "0"
RUN_SLOTS = 1024
WORKER_SLOTS = 1024  # worker processes the dashboard lists at once (more share slots and flicker)
BEAT = 2.0  # s between a worker's beats
BEAT_TTL = 3 * BEAT  # a worker that stops beating leaves the registry after this long
POOL_VAR = "PACKMULE_WORKER_POOL"  # (spawner to worker: how many processes its pool has)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, float("inf"))
DUR_KEYS = tuple(f"dur:{i}" for i in range(len(BUCKETS)))
STAT_KEYS = ("done", "failed", "retried", "dur_us", "dur_n", *DUR_KEYS)
RATE_WINDOW = 30.0  # s of samples a Watcher's rate is taken over


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
        while True:
            with contextlib.suppress(Exception):  # servers away: the next beat tries again
                self.beat()
            if self._stop.wait(BEAT):
                return

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
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


# --- reading it all: the dashboard's view --------------------------------------------
@dataclass
class RunInfo:
    name: str
    generation: str
    started_at: float
    done: int
    total: int
    failed: int
    progress: str  # exactly what update_progress() renders
    state: str  # running | complete | failed | stalled | cancelled | lost
    complete: bool
    rate: float | None  # jobs per second, recently
    eta: float | None  # seconds to go at that rate; 0.0 once complete

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkerInfo:
    id: str
    host: str
    pid: int
    backend: str
    concurrency: int
    jobs_run: int
    running: list[str]
    rss: int
    started_at: float
    last_seen: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Metrics:
    done: int
    failed: int
    retried: int
    running: int
    workers: int
    runs_active: int
    queue: dict[str, QueueStats]
    duration_buckets: list[tuple[float, int]] = field(default_factory=list)  # (le, cumulative count)
    duration_sum: float = 0.0
    duration_count: int = 0


class Watcher:
    """Reads the registry, runs' counters and workers' beats of one backend."""

    def __init__(self, backend: Backend | None = None) -> None:
        from packmule._core import config as _config

        # (a connection of its own: a web server's threads must not wait behind, or
        # take the posted failures of, the driver's own calls in the same process)
        self.backend = (backend if backend is not None else _config.get_backend()).for_thread()
        self.store = self.backend.store
        self._samples: OrderedDict[tuple[str, str], list[tuple[float, int]]] = OrderedDict()
        self._lock = threading.Lock()

    # runs
    def runs(self, name_filter: str = "", limit: int = 1000) -> list[RunInfo]:
        """The registered runs, newest first (at most ``limit``, at most RUN_SLOTS)."""
        raw = self.store.get_many(["pm-reg:rseq"]).get("pm-reg:rseq")
        last = int(raw) if raw is not None else 0
        ks = range(last, max(0, last - min(limit, RUN_SLOTS)), -1)
        got = self.store.get_many([f"pm-reg:r:{k % RUN_SLOTS}" for k in ks])
        entries = []
        for k in ks:
            blob = got.get(f"pm-reg:r:{k % RUN_SLOTS}")
            if blob is None:
                continue
            entry = json.loads(blob)
            if entry["k"] == k and name_filter in entry["name"]:
                entries.append((entry["name"], entry["gen"], float(entry["t"])))
        return self._infos(entries)

    def run(self, name: str, generation: str | None = None) -> RunInfo | None:
        """The run's current generation (what ``update_progress()`` reads), or the one named."""
        if generation is None:
            raw = self.store.get_many([pointer(name)]).get(pointer(name))
            if raw is None:
                return None
            generation = raw.decode()
        infos = self._infos([(name, generation, None)])
        return infos[0] if infos else None

    def _infos(self, entries: Sequence[tuple[str, str, float | None]]) -> list[RunInfo]:
        if not entries:
            return []
        fields = ("total", "done", "failed", "cancel", "t")
        keys = [prefix(name, gen) + f for name, gen, _ in entries for f in fields]
        got = self.store.get_many(keys)
        idle: bool | None = None
        now = time.time()
        out = []
        for name, gen, started in entries:
            p = prefix(name, gen)
            if started is None:
                started = float(got.get(p + "t", b"0").split()[0])
            counts = [got.get(p + f) for f in ("done", "total", "failed")]
            if None in counts:
                out.append(RunInfo(name, gen, started, 0, 0, 0, "0.0 / 0.0", "lost", False, None, None))
                continue
            done, total, failed = (int(c or 0) for c in counts)
            complete = total > 0 and done == total
            if p + "cancel" in got:
                state = "cancelled"
            elif complete:
                state = "failed" if failed else "complete"
            else:
                if idle is None:
                    idle = self._queue_idle()
                state = "stalled" if idle else "running"
            rate = self._rate(name, gen, now, done, started, complete)
            eta = 0.0 if complete else ((total - done) / rate if rate else None)
            out.append(RunInfo(name, gen, started, done, total, failed, f"{float(done)} / {float(total)}", state,
                               complete, rate, eta))
        return out

    def _queue_idle(self) -> bool:
        s = self.backend.queue.stats()
        return not (s.ready or s.reserved or s.delayed)

    def _rate(self, name: str, gen: str, now: float, done: int, started: float, complete: bool) -> float | None:
        """Jobs per second over the last RATE_WINDOW seconds this watcher saw the
        run; before it has two looks, the mean since the run started."""
        with self._lock:
            samples = self._samples.setdefault((name, gen), [])
            self._samples.move_to_end((name, gen))
            while len(self._samples) > 2 * RUN_SLOTS:
                self._samples.popitem(last=False)
            if not samples or samples[-1][1] != done or now - samples[-1][0] > 1.0:
                samples.append((now, done))
            while len(samples) > 2 and now - samples[1][0] > RATE_WINDOW:
                samples.pop(0)
            t0, d0 = samples[0]
        if complete:
            return (done - d0) / (now - t0) if d0 < done and now > t0 else None
        if now - t0 >= 1.0 and len(samples) > 1:
            return (done - d0) / (now - t0)
        return done / (now - started) if started and now > started else None

    def failures(self, info: RunInfo, limit: int = 100) -> list[dict[str, str]]:
        """The run's failed jobs (first ``limit``): job, method, args, exc_type, message, traceback."""
        from packmule._driver.runner import signer_for
        from packmule._model.records import records

        p = prefix(info.name, info.generation)
        got = self.store.get_many([f"{p}f:{k}" for k in range(1, min(info.failed, limit) + 1)])
        ids = [job_id(info.name, info.generation, raw.decode()) for raw in got.values()]
        recs = records(self.store, signer_for(self.backend), ids)
        out = []
        for ref_id in ids:
            rec = recs.get(ref_id)
            if rec is not None and rec[0] == "err":
                info_ = rec[1]
                out.append({"job": ref_id, "method": info_.get("method", ""), "args": info_.get("args", ""),
                            "exc_type": info_.get("exc_type", ""), "message": info_.get("message", ""),
                            "traceback": info_.get("traceback", "")})
        return out

    def value_repr(self, info: RunInfo, limit: int = 2000) -> str | None:
        """``repr`` of the run's return value, once it is complete and if it was recorded."""
        from packmule._driver.runner import signer_for
        from packmule._model.records import records

        if not info.complete:
            return None
        key = prefix(info.name, info.generation) + "root"
        root = self.store.get_many([key]).get(key)
        if root is None:
            return None
        ref = job_id(info.name, info.generation, root.decode())
        rec = records(self.store, signer_for(self.backend), [ref]).get(ref)
        if rec is None or rec[0] != "ok":
            return None
        text = repr(rec[1])
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def cancel(self, name: str) -> None:
        from packmule._driver.runner import Runner

        Runner(name, backend=self.backend).cancel()

    def forget(self, name: str) -> None:
        from packmule._driver.runner import Runner

        Runner(name, backend=self.backend).forget()

    # workers, queue, totals
    def workers(self) -> list[WorkerInfo]:
        slots = self.store.get_many([f"pm-reg:ws:{i}" for i in range(WORKER_SLOTS)])
        ids = sorted({raw.decode() for raw in slots.values()})
        got = self.store.get_many([f"pm-reg:w:{i}" for i in ids])
        now = time.time()
        out = []
        for i in ids:
            raw = got.get(f"pm-reg:w:{i}")
            if raw is not None:
                info = WorkerInfo(**json.loads(raw))
                if now - info.last_seen <= BEAT_TTL:  # (a backend whose ttl is coarse keeps it a little longer)
                    out.append(info)
        return sorted(out, key=lambda w: (w.host, w.pid))

    def queue(self) -> dict[str, QueueStats]:
        return dict(self.backend.queue.stats_by_server())

    def metrics(self) -> Metrics:
        got = self.store.get_many([f"pm-stats:{k}" for k in STAT_KEYS])
        value = {k: int(got.get(f"pm-stats:{k}", b"0")) for k in STAT_KEYS}
        workers = self.workers()
        cumulative, buckets = 0, []
        for i, le in enumerate(BUCKETS):
            cumulative += value[f"dur:{i}"]
            buckets.append((le, cumulative))
        active = sum(1 for r in self.runs() if r.state in ("running", "stalled"))
        return Metrics(value["done"], value["failed"], value["retried"], sum(len(w.running) for w in workers),
                       len(workers), active, self.queue(), buckets, value["dur_us"] / 1e6, value["dur_n"])
