"""The registry as a dashboard reads it (``Watcher``): the recent runs, each with its
state (running, complete, failed, stalled, cancelled, lost), rate and ETA, the live
workers, the queue, each server's state, and the totals from every worker.  What
the job path writes is ``packmule._model.registry``'s; ``Watcher`` is all that
``packmule.web`` talks to."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from packmule._driver.run_state import current_gen
from packmule._driver.runner import Runner
from packmule._model.keys import job_id, prefix
from packmule._model.records import records
from packmule._model.registry import BEAT_TTL, BUCKETS, RUN_SLOTS, STAT_KEYS, WORKER_SLOTS
from packmule._transport.codec import signer_for
from packmule.backends import _choice
from packmule.backends.base import Backend, QueueStats, ServerState

__all__ = ["Metrics", "RunInfo", "Watcher", "WorkerInfo"]

RATE_WINDOW = 30.0  # s of samples a Watcher's rate is taken over


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
    delayed: int = 0  # jobs queued with a delay (delay=, at=) that have not run yet

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
        # (a connection of its own: a web server's threads must not wait behind, or
        # take the posted failures of, the driver's own calls in the same process)
        self.backend = (backend if backend is not None else _choice.get_backend()).for_thread()
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
            generation = current_gen(self.backend, name)
            if generation is None:
                return None
        infos = self._infos([(name, generation, None)])
        return infos[0] if infos else None

    def _infos(self, entries: Sequence[tuple[str, str, float | None]]) -> list[RunInfo]:
        if not entries:
            return []
        fields = ("total", "done", "failed", "cancel", "t", "held")
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
                               complete, rate, eta, int(got.get(p + "held") or 0)))
        return out

    def _queue_idle(self) -> bool:
        s = self.backend.queue.stats()
        return not (s.ready or s.reserved or s.delayed or self.backend.queue.uncounted())

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
        Runner(name, backend=self.backend).cancel()

    def forget(self, name: str) -> None:
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

    def servers(self) -> list[ServerState]:
        """Each server of the backend as this process sees it (up, set aside since when, back
        since when, its role), the ones that look up probed now; none for a backend without servers."""
        return self.backend.server_states()

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
