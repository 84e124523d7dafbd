"""The worker side of the protocol: run a batch of reserved jobs, then commit
their effects in a few bulk store calls.  Every backend's workers run this.

Exactly-once effects, with jobs that may run twice:
- a job's *completion* is the ``add`` of its value key: one execution wins it,
  and only the winner counts ``done``/``failed`` and notifies its watchers;
- a job's *enqueues* are buffered while it runs and committed when it returns;
  the ``add`` of its commit marker counts them in ``total`` once (a re-run puts
  the same logical children again; their own value keys make them count once);
- a continuation is put when its arrived-inputs counter reaches the number of
  inputs told to notify it: ``incr`` results are distinct, so exactly one
  notifier sees the last value and puts it.

Order, so nothing is lost when a worker dies anywhere: store effects, then the
queue puts, then the ack.
"""

from __future__ import annotations

import contextvars
import logging
import pickle
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from packmule._codec import Forged, Signer
from packmule._errors import JobFailed
from packmule._state import GONE, blob_key, job_id, prefix, records, value_key
from packmule._types import JobRef
from packmule._wire import Task, decode, encode
from packmule.backends.base import Backend, Put, Reserved

log = logging.getLogger("packmule")

HANDBACK_AFTER = 0.05  # s: a batch running longer hands its unstarted jobs back
FAST = 0.002  # s: jobs of a method quicker than this on average run a whole bundle in one go
POLL_DELAY = 0.25  # s: a continuation whose inputs are not all done checks again after this
MAX_BACKOFF = 300.0  # s: the longest retry delay


@dataclass
class Spec:
    """A continuation (deferred_result inside a job), stored under ``spec:<path>``."""

    method: str
    inputs: list[str]  # job ids, in the order of deferred_result's list
    call: tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) after the values
    digest: str
    ttr: float
    max_retries: int
    retry_delay: float
    record: bool
    counted: int  # inputs that will notify it; the rest are polled
    finishes: list[tuple[str, bool]] = field(default_factory=list)  # (path, is a job) it completes
    watchers: list[tuple[str, int]] = field(default_factory=list)


class JobContext:
    """What a running job has buffered: the jobs it enqueued and its continuations."""

    __slots__ = ("backend", "task", "handle", "position", "children", "child_index", "deferreds", "blobs")

    def __init__(self, backend: Backend, task: Task, handle: Any) -> None:
        self.backend, self.task, self.handle = backend, task, handle
        self.position = 0
        self.children: list[Task] = []
        self.child_index: dict[str, int] = {}  # path -> index in children
        self.deferreds: dict[str, Spec] = {}
        self.blobs: dict[str, bytes] = {}

    def next_path(self) -> str:
        path = f"{self.task.path}.{self.position}"
        self.position += 1
        return path


current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("packmule_job", default=None)


def failure_info(task: Task, method: str, args: Any, exc: BaseException) -> dict[str, str]:
    return {
        "job": job_id(task.name, task.gen, task.path),
        "method": method,
        "args": _short_repr(args),
        "exc_type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _short_repr(args: Any) -> str:
    try:
        text = repr(args)
    except Exception as exc:  # a repr that raises must not hide the real failure
        text = f"<unrepresentable: {exc!r}>"
    return text if len(text) <= 500 else text[:497] + "..."


class Outcome:
    """What became of one task in a batch."""

    __slots__ = ("item", "task", "kind", "record", "ctx", "handoff", "spec", "consumed", "p")

    def __init__(self, item: Reserved, task: Task, kind: str, record: tuple[Any, ...] | None = None,
                 ctx: JobContext | None = None, handoff: str | None = None, spec: Spec | None = None,
                 p: str | None = None) -> None:
        self.item, self.task = item, task
        self.kind = kind  # 'done' | 'raised' | 'retry' | 'poll' | 'ack' | 'bury' | 'handback'
        self.record = record
        self.ctx = ctx
        self.handoff = handoff  # path of the own continuation the job returned
        self.spec = spec  # the task's own spec, when it is a continuation
        self.consumed: list[str] = []  # value keys to mark gone (record=False)
        self.p = p or prefix(task.name, task.gen)


class Engine:
    """Runs batches of reserved jobs for one backend, in one worker process."""

    def __init__(self, backend: Backend, ttl: float) -> None:
        self.backend, self.ttl = backend, ttl
        self.signer = Signer(backend.secret())
        self.queue, self.store = backend.queue, backend.store
        self._runners: dict[str, tuple[Any, bytes]] = {}
        self._speed: dict[str, float] = {}  # method -> recent seconds per job, in this process

    # --- decoding ------------------------------------------------------------
    def decode(self, items: Sequence[Reserved]) -> list[tuple[Reserved, Task]]:
        out = []
        for item in items:
            try:
                out += [(item, task) for task in decode(self.signer, item.body)]
            except Forged as exc:
                log.warning("buried job %s on %s: %s; it was not unpickled", item.handle, item.server, exc)
                self.queue.bury(item.handle)
            except Exception as exc:
                log.warning("buried job %s on %s: unreadable body: %r", item.handle, item.server, exc)
                self.queue.bury(item.handle)
        return out

    def runner(self, digest: str, blob: bytes | None) -> Any:
        """A fresh runner object for a job: unpickled once per digest, then
        copied per job, so jobs never share mutable state."""
        cached = self._runners.get(digest)
        if cached is None:
            if blob is None:
                raise LookupError(f"runner {digest} is gone from the store")
            if len(self._runners) >= 1024:
                self._runners.clear()
            proto = self.signer.loads(blob)
            cls: Any = type(proto)
            cached = (cls, cloudpickle.dumps(proto.__getstate__(), 5))
            self._runners[digest] = cached
        cls, state = cached
        obj: Any = cls.__new__(cls)
        obj.__setstate__(pickle.loads(state))
        obj.__dict__["_pm_backend"] = self.backend
        return obj

    # --- running ---------------------------------------------------------------
    def run_batch(self, items: Sequence[Reserved]) -> int:
        """Run and commit a batch; returns how many tasks ran user code."""
        tasks = self.decode(items)
        if not tasks:
            return 0
        keys: set[str] = set()
        per_item = Counter(id(item) for item, _ in tasks)
        for item, t in tasks:
            p = prefix(t.name, t.gen)
            keys.update((p + "total", p + "cancel"))
            if per_item[id(item)] == 1:  # a lone job may be a re-delivery of a completed one
                keys.add(p + "v:" + t.path)
            if t.method is None:
                keys.add(p + "spec:" + t.path)
            if t.digest not in self._runners:
                keys.add(blob_key(t.digest))
        got = self.store.get_many(list(keys))
        specs = {}
        for _, t in tasks:
            if t.method is None:
                raw = got.get(prefix(t.name, t.gen) + "spec:" + t.path)
                if raw is not None:
                    specs[t.path, t.name, t.gen] = Spec(**self.signer.loads(raw))
        inputs = sorted({i for s in specs.values() for i in s.inputs})
        trail: list[str] = []
        recs = records(self.store, self.signer, inputs, trail) if inputs else {}

        outcomes: list[Outcome] = []
        tasks = self._split_unknown(tasks, outcomes)
        started = time.monotonic()
        ran = 0
        prefixes: dict[tuple[str, str], str] = {}
        for n, (item, t) in enumerate(tasks):
            if n and time.monotonic() - started > HANDBACK_AFTER:
                outcomes.extend(Outcome(i, tt, "handback") for i, tt in tasks[n:])
                break
            p = prefixes.get((t.name, t.gen)) or prefixes.setdefault((t.name, t.gen), prefix(t.name, t.gen))
            if p + "total" not in got:
                log.warning("buried job %s: run %r has no state in the store (lost or forgotten)",
                            job_id(t.name, t.gen, t.path), t.name)
                outcomes.append(Outcome(item, t, "bury"))
            elif p + "cancel" in got or p + "v:" + t.path in got:
                outcomes.append(Outcome(item, t, "ack"))  # cancelled, or a re-run of a completed job
            elif t.method is None:
                spec = specs.get((t.path, t.name, t.gen))
                if spec is None:
                    log.warning("buried continuation %s: its spec is gone from the store",
                                job_id(t.name, t.gen, t.path))
                    outcomes.append(Outcome(item, t, "bury"))
                    continue
                outcomes.append(self._run_continuation(item, t, spec, recs, got, trail))
                ran += 1
            else:
                outcomes.append(self._call(item, t, t.method, got, p=p))
                ran += 1
        took = (time.monotonic() - started) / max(ran, 1)
        for method in {t.method for _, t in tasks if t.method is not None}:
            self._speed[method] = 0.5 * self._speed.get(method, took) + 0.5 * took
        self.commit(outcomes)
        return ran

    def _split_unknown(self, tasks: list[tuple[Reserved, Task]],
                       outcomes: list[Outcome]) -> list[tuple[Reserved, Task]]:
        """Of a bundle whose method is not known to be quick, keep the first job
        and hand the rest back (as one new bundle) for any worker to take."""
        keep: list[tuple[Reserved, Task]] = []
        for n, (item, t) in enumerate(tasks):
            first = n == 0 or tasks[n - 1][0] is not item
            if first or t.method is None or self._speed.get(t.method, 1.0) < FAST:
                keep.append((item, t))
            else:
                outcomes.append(Outcome(item, t, "handback"))
        return keep

    def _call(self, item: Reserved, t: Task, method: str, got: dict[str, bytes],
              lead: tuple[Any, ...] = (), p: str | None = None) -> Outcome:
        args, kwargs = t.args, t.kwargs
        try:
            runner = self.runner(t.digest, got.get(blob_key(t.digest)))
            fn: Callable[..., Any] = getattr(runner, method)
        except Exception as exc:
            info = failure_info(t, method, "<not loaded>", exc)
            log.warning("job %s cannot be loaded: %s: %s", info["job"], info["exc_type"], exc)
            return Outcome(item, t, "raised", record=("err", info))
        ctx = JobContext(self.backend, t, item.handle)
        token = current.set(ctx)
        try:
            value = fn(*lead, *args, **kwargs)
        except Exception as exc:
            shown = (*lead, *args) if not lead else ("<values>", *args)
            return Outcome(item, t, "raised", record=("err", failure_info(t, method, shown, exc)))
        finally:
            current.reset(token)
        if isinstance(value, JobRef):
            name, gen, path = value.parts
            if (name, gen) == (t.name, t.gen) and path in ctx.deferreds:
                return Outcome(item, t, "done", ctx=ctx, handoff=path)
            return Outcome(item, t, "done", ("ref", value.id), ctx)
        return Outcome(item, t, "done", ("ok", value), ctx, p=p)

    def _run_continuation(self, item: Reserved, t: Task, spec: Spec, recs: dict[str, tuple[Any, ...]],
                          got: dict[str, bytes], trail: list[str]) -> Outcome:
        values = []
        for ref_id in spec.inputs:
            rec = recs.get(ref_id)
            if rec is None:
                return Outcome(item, t, "poll", spec=spec)
            if rec[0] == "err":
                info = dict(rec[1])
                via = info.get("via", "")
                info["via"] = (f"deferred_result {spec.method} ({job_id(t.name, t.gen, t.path)}) "
                               f"got the failed input {ref_id}\n" + via)
                return Outcome(item, t, "done", ("err", info), spec=spec)
            if rec[0] == "gone":
                info = {"job": job_id(t.name, t.gen, t.path), "method": spec.method, "args": "",
                        "exc_type": "ValuesNotRecorded",
                        "message": f"input {ref_id} was already consumed by another deferred_result "
                                   "and record_return_values is False", "traceback": ""}
                return Outcome(item, t, "done", ("err", info), spec=spec)
            values.append(rec[1])
        args, kwargs = spec.call
        call_task = t._replace(args=args, kwargs=kwargs, digest=spec.digest)
        out = self._call(item, call_task, spec.method, got, lead=(values,))
        out.task, out.spec = t, spec
        if not spec.record:
            out.consumed = [value_key(i) for i in spec.inputs] + [value_key(i) for i in trail]
        return out

    # --- committing --------------------------------------------------------------
    def commit(self, outcomes: list[Outcome]) -> None:
        self._settle_raised(outcomes)
        done = [o for o in outcomes if o.kind == "done"]
        adds: dict[str, bytes | int] = {}
        for o in done:
            t, p, ctx = o.task, o.p, o.ctx
            if ctx is not None and (ctx.children or ctx.deferreds):
                adds.update((blob_key(d), b) for d, b in ctx.blobs.items())
                adds[p + "cm:" + t.path] = b"1"
                for path, spec in ctx.deferreds.items():
                    if path == o.handoff:
                        own = o.spec.finishes if o.spec else []
                        spec.finishes = [*own, (t.path, t.method is not None)]
                        spec.watchers = spec.watchers + self._watchers(o)
                    adds[p + "n:" + path] = 0
                    adds[p + "spec:" + path] = self.signer.dumps(vars(spec))
            if o.handoff is None:
                assert o.record is not None
                adds[p + "v:" + t.path] = self.signer.dumps(o.record)
        won = self.store.add_many(adds, self.ttl) if adds else set()

        deltas: dict[str, int] = defaultdict(int)
        sets: dict[str, bytes] = {}
        fire: dict[str, tuple[int, Task]] = {}  # n: key -> (inputs expected, continuation task)
        failed_paths: dict[str, list[str]] = defaultdict(list)
        for o in done:
            t, p, ctx = o.task, o.p, o.ctx
            if ctx is not None and ctx.children and p + "cm:" + t.path in won:
                won.discard(p + "cm:" + t.path)  # a job twice in one batch counts once
                deltas[p + "total"] += len(ctx.children)
            key = p + "v:" + t.path
            if o.handoff is not None or key not in won:
                continue
            won.discard(key)
            assert o.record is not None
            failed = o.record[0] == "err"
            if o.spec is None:  # a job: it finishes itself
                deltas[p + "done"] += 1
                if failed:
                    deltas[p + "failed"] += 1
                    failed_paths[p].append(t.path)
                watchers: Sequence[tuple[str, int]] = t.watchers
            else:  # a continuation finishes the jobs that handed their value to it
                finished = [path for path, is_job in o.spec.finishes if is_job]
                deltas[p + "done"] += len(finished)
                if failed:
                    deltas[p + "failed"] += len(finished)
                    failed_paths[p] += finished
                ref = self.signer.dumps(("ref", job_id(t.name, t.gen, t.path)))
                sets.update((p + "v:" + path, ref) for path, _ in o.spec.finishes)
                watchers = o.spec.watchers
            for w_path, expected in watchers:
                deltas[p + "n:" + w_path] += 1
                fire[p + "n:" + w_path] = (expected, self._continuation_task(t, w_path))
            if o.consumed:
                gone = self.signer.dumps(GONE)
                sets.update((k, gone) for k in o.consumed)
        results = self.store.incr_many(deltas) if deltas else {}
        later: list[Task] = []  # children and continuations to queue
        for key, value in results.items():
            if value is None:
                log.warning("run state lost: counter %s is gone from the store", key)
            elif key in fire and value == fire[key][0]:
                later.append(fire[key][1])
            elif key.endswith(":failed"):
                p = key[: -len("failed")]
                paths = failed_paths[p]
                sets.update((f"{p}f:{value - len(paths) + 1 + i}", path.encode()) for i, path in enumerate(paths))
        if sets:
            self.store.set_many(sets, self.ttl)

        for o in done:
            if o.ctx is not None:
                later += o.ctx.children
                later += [self._continuation_task(o.task, path)
                          for path, spec in o.ctx.deferreds.items() if spec.counted == 0]
        self._finish_queue(outcomes, later)

    def _settle_raised(self, outcomes: list[Outcome]) -> None:
        """Count the failed attempt of each job that raised: retry it (with
        backoff) or turn it into a failure for good."""
        raised = [o for o in outcomes if o.kind == "raised"]
        if not raised:
            return
        keys = {prefix(o.task.name, o.task.gen) + "try:" + o.task.path: o for o in raised}
        self.store.add_many({k: 0 for k in keys}, self.ttl)
        tries = self.store.incr_many({k: 1 for k in keys})
        for key, o in keys.items():
            attempt = tries.get(key) or 1
            assert o.record is not None
            info = o.record[1]
            limit = o.spec.max_retries if o.spec else o.task.max_retries
            if attempt <= limit:
                base = o.spec.retry_delay if o.spec else o.task.retry_delay
                delay = min(base * 2 ** (attempt - 1), MAX_BACKOFF)
                log.warning("job %s raised %s: %s; retry %d of %d in %.1fs", info["job"], info["exc_type"],
                            info["message"], attempt, limit, delay)
                o.kind, o.record = "retry", (delay,)
            else:
                log.warning("job %s failed for good after %d attempts: %s: %s", info["job"], attempt,
                            info["exc_type"], info["message"])
                o.kind, o.ctx, o.handoff, o.consumed = "done", None, None, []

    def _watchers(self, o: Outcome) -> list[tuple[str, int]]:
        return list(o.spec.watchers) if o.spec is not None else list(o.task.watchers)

    def _continuation_task(self, parent: Task, path: str) -> Task:
        return parent._replace(path=path, method=None, args=(), kwargs={}, watchers=())

    def _finish_queue(self, outcomes: list[Outcome], later: list[Task]) -> None:
        """Queue what the batch produced, then settle each reserved item: an item
        of one job is acked, released or buried as that job requires; an item of
        several is acked once its jobs that must run again are queued anew."""
        by_item: dict[int, list[Outcome]] = defaultdict(list)
        for o in outcomes:
            by_item[id(o.item)].append(o)
        acks, releases, buries = [], [], []
        delayed: list[Put] = []
        for group in by_item.values():
            handle = group[0].item.handle
            if len(group) == 1:
                o = group[0]
                failed = o.record is not None and o.record[0] == "err"
                if o.kind == "bury" or (o.kind == "done" and failed):
                    buries.append(handle)
                elif o.kind in ("done", "ack"):
                    acks.append(handle)
                else:
                    delay = o.record[0] if o.kind == "retry" and o.record else POLL_DELAY if o.kind == "poll" else 0.0
                    releases.append((handle, delay))
                continue
            later += [o.task for o in group if o.kind == "handback"]
            for o in group:
                if o.kind == "retry":  # alone, after its backoff
                    assert o.record is not None
                    delayed += [put._replace(delay=o.record[0]) for put in encode(self.signer, [o.task])]
            acks.append(handle)
        puts = encode(self.signer, later) + delayed
        if puts:
            self.queue.put_many(puts)
        for handle, delay in releases:
            self.queue.release(handle, delay)
        for handle in buries:
            self.queue.bury(handle)
        if acks:
            self.queue.ack_many(acks)


def raise_failure(record: tuple[Any, ...]) -> None:
    if record[0] == "err":
        info = record[1]
        raise JobFailed(info, via=info.get("via", "").strip() or None)
