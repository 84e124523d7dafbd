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

import contextlib
import contextvars
import logging
import pickle
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cloudpickle

from packmule._core import config as _config
from packmule._core.errors import BackendUnavailable
from packmule._core.tracebacks import describe, short_repr
from packmule._core.types import JobRef
from packmule._model.keys import blob_key, job_id, parse_job_id, prefix, rejected_key, value_key
from packmule._model.methods import refusal
from packmule._model.records import GONE, records
from packmule._model.registry import STATS
from packmule._transport.codec import Forged, Signer, dumps
from packmule._transport.spill import gather, gather_one, spill_bodies, spill_values
from packmule._transport.wire import Task, decode, encode
from packmule._worker import recovery as _recovery
from packmule._worker.watchdog import Watchdog
from packmule.backends.base import Backend, Put, Reserved

log = logging.getLogger("packmule")

HANDBACK_AFTER = 0.05  # s: a batch running longer hands its unstarted jobs back
FAST = 0.002  # s: jobs of a method quicker than this on average run a whole bundle in one go
POLL_DELAY = 0.25  # s: a continuation whose inputs are not all done checks again after this
MAX_BACKOFF = 300.0  # s: the longest retry delay
RECOMMIT_DELAY = 5.0  # s before a queue item whose commit failed twice is tried again
REJECTED_TTL = 3600.0  # s a note that jobs were refused for their signature stays in the store
MAX_CRASHES = 3  # deaths of its worker a job may cause before it fails for good (Runner.max_crashes)


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


# Fault injection for the fault tests: a job may arm a hook in its own worker
# process (``FAULTS["after_add"] = ...``); it is called once, at that point of
# the commit.  Empty, it costs one truth test per batch.
FAULTS: dict[str, Callable[[], None]] = {}


def _fault(point: str) -> None:
    hook = FAULTS.pop(point, None)
    if hook is not None:
        hook()


current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("packmule_job", default=None)


def failure_info(task: Task, method: str, args: Any, exc: BaseException) -> dict[str, str]:
    """The failure record of what a job raised (``describe``: whatever it raised, this never raises)."""
    shown = describe(exc)
    return {"job": job_id(task.name, task.gen, task.path), "method": method, "args": short_repr(args),
            "exc_type": shown.exc_type, "message": shown.message, "traceback": shown.traceback}


def packmule_failure(task: Task, spec: Spec | None, exc_type: str, message: str) -> tuple[str, dict[str, str]]:
    """The failure record of a job that packmule failed (not its own exception):
    it crashed its workers, or its value could not be stored or committed."""
    method = task.method or (spec.method if spec else "(continuation)")
    log.warning("job %s failed for good: %s", job_id(task.name, task.gen, task.path), message)
    return ("err", {"job": job_id(task.name, task.gen, task.path), "method": method, "args": short_repr(task.args),
                    "exc_type": exc_type, "message": message, "traceback": ""})


class Outcome:
    """What became of one task in a batch."""

    __slots__ = ("item", "task", "p", "kind", "record", "ctx", "handoff", "spec", "consumed")

    def __init__(self, item: Reserved, task: Task, p: str, kind: str, record: tuple[Any, ...] | None = None,
                 ctx: JobContext | None = None, handoff: str | None = None, spec: Spec | None = None) -> None:
        self.item, self.task = item, task
        self.p = p  # the run's key prefix
        self.kind = kind  # 'done' | 'raised' | 'retry' | 'poll' | 'ack' | 'again' | 'bury' | 'handback' | 'split'
        self.record = record
        self.ctx = ctx
        self.handoff = handoff  # path of the own continuation the job returned
        self.spec = spec  # the task's own spec, when it is a continuation
        self.consumed: Sequence[str] = ()  # value keys to mark gone (record=False)


class Counts(NamedTuple):
    """What a commit counts, from the adds it won (``Engine._count``)."""

    deltas: dict[str, int]  # counter key -> increment
    handoffs: dict[str, bytes]  # value key -> record: consumed inputs (record=False), marked gone
    fire: dict[str, tuple[int, Task]]  # n: key -> (inputs expected, the continuation to queue when reached)
    failed_paths: dict[str, list[str]]  # run prefix -> paths of the jobs that failed for good
    counted: dict[str, bytes]  # cm: key -> the marker that says its children are counted in total
    lost: list[Outcome]  # jobs whose value another execution stored first


class Bundle(NamedTuple):
    """The tasks of one reserved queue item: they share a run, a method and a
    runner (``packmule._transport.wire``), so what depends only on those is done once."""

    item: Reserved
    p: str  # the run's key prefix
    tasks: list[Task]


# Exact types whose values no job can change in place.  JobRef is a tuple of
# two str with no attributes of its own.
_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, JobRef})


def _immutable(value: Any) -> bool:
    kind = type(value)
    if kind in _IMMUTABLE:
        return True
    if kind is tuple or kind is frozenset:
        return all(_immutable(v) for v in value)
    return False


class RunnerMaker:
    """Makes a fresh runner object per job from one stored runner, so jobs never
    share mutable state.

    A runner whose attributes are all immutable (the usual case: a name, flags,
    numbers, strings) is copied shallowly from a prototype: a shallow copy of
    such an object is as fresh as an unpickled one, and ten times cheaper.  Any
    other runner, or one whose class customizes ``__getstate__``/``__setstate__``,
    is unpickled from its state for every job."""

    __slots__ = ("cls", "backend", "attrs", "state")

    def __init__(self, proto: Any, backend: Backend) -> None:
        from packmule._driver.runner import Runner  # (a circular import at module level)

        cls: Any = type(proto)
        self.cls, self.backend = cls, backend
        state = proto.__getstate__()
        self.attrs: dict[str, Any] | None = None
        self.state = b""
        if (cls.__getstate__ is Runner.__getstate__ and cls.__setstate__ is Runner.__setstate__
                and all(_immutable(v) for v in state.values())):
            self.attrs = self._build(state).__dict__
        else:
            self.state = cloudpickle.dumps(state, 5)

    def _build(self, state: Any) -> Any:
        obj = self.cls.__new__(self.cls)
        obj.__setstate__(state)
        obj.__dict__["_pm_backend"] = self.backend
        return obj

    def __call__(self) -> Any:
        if self.attrs is None:
            return self._build(pickle.loads(self.state))
        obj = self.cls.__new__(self.cls)
        obj.__dict__ = self.attrs.copy()
        return obj


class Engine:
    """Runs batches of reserved jobs for one backend, in one worker process."""

    def __init__(self, backend: Backend, ttl: float) -> None:
        self.backend, self.ttl = backend, ttl
        self.signer = Signer(backend.secret())
        self.queue, self.store = backend.queue, backend.store
        self.watchdog = Watchdog.current = Watchdog(backend.queue)
        self._runners: dict[str, RunnerMaker] = {}
        self._speed: dict[str, float] = {}  # method -> recent seconds per job, in this process
        self.max_payload = _config.max_payload()
        self.delay_scale = _config.delay_scale()  # (PACKMULE_DELAY_SCALE) on retry backoff and POLL_DELAY

    # --- decoding ------------------------------------------------------------
    def decode(self, items: Sequence[Reserved]) -> list[Bundle]:
        out = []
        rejected: dict[str, bytes] = {}
        for item in items:
            try:
                tasks = decode(self.signer, gather_one(self.store, self.signer, item.body))
                out.append(Bundle(item, prefix(tasks[0].name, tasks[0].gen), tasks))
            except Forged as exc:
                log.warning("buried job %s on %s: %s (it claims key id %s; this worker's is %s); it was not "
                            "unpickled", item.handle, item.server, exc, exc.key_id or "none",
                            self.signer.key_id.hex())
                self.queue.bury(item.handle)
                if exc.key_id and exc.key_id != self.signer.key_id.hex():
                    # what the driver of that secret reads (its key id is all this
                    # says of the body, which is trusted for nothing else); a body
                    # claiming this worker's own key id with a wrong tag was tampered
                    # with or forged, and there is no driver of another secret to warn
                    rejected[rejected_key(exc.key_id)] = f"{time.time():.3f} {self.signer.key_id.hex()}".encode()
            except Exception as exc:
                log.warning("buried job %s on %s: unreadable body: %r", item.handle, item.server, exc)
                self.queue.bury(item.handle)
        if rejected:
            self.store.set_many(rejected, REJECTED_TTL)
        return out

    def runner(self, digest: str, got: dict[str, bytes]) -> Any:
        """A fresh runner object for a job: unpickled once per digest (its blob
        is in ``got`` when not cached), then copied per job."""
        maker = self._runners.get(digest)
        if maker is None:
            blob = got.get(blob_key(digest))
            if blob is None:
                raise LookupError(f"runner {digest} is gone from the store")
            if len(self._runners) >= 1024:
                self._runners.clear()
            maker = self._runners[digest] = RunnerMaker(self.signer.loads(blob), self.backend)
        return maker()

    # --- running ---------------------------------------------------------------
    def run_batch(self, items: Sequence[Reserved]) -> int:
        """Run and commit a batch; returns how many tasks ran user code."""
        items = self._isolate_suspects(items)
        bundles = self.decode(items)
        if not bundles:
            return 0
        for item, _, tasks in bundles:
            self.watchdog.hold(item.handle, tasks[0].ttr)
        got, specs, recs, trail = self._fetch(bundles)
        outcomes: list[Outcome] = []
        bundles = self._set_aside_crashers(bundles, outcomes, got, specs)
        self._split_unknown(bundles, outcomes)
        started = time.monotonic()
        ran = 0
        durations = STATS.durations  # (what the dashboard's totals and histogram are made of)
        for b, (item, p, tasks) in enumerate(bundles):
            settled = self._settled(item, p, tasks, got, specs)
            if settled is not None:
                outcomes += settled
                continue
            for n, t in enumerate(tasks):
                if (b or n) and time.monotonic() - started > HANDBACK_AFTER:
                    outcomes.extend(Outcome(item, tt, p, "handback") for tt in tasks[n:])
                    outcomes.extend(Outcome(i, tt, pp, "handback") for i, pp, rest in bundles[b + 1:] for tt in rest)
                    break
                if t.method is not None:
                    STATS.current, began = t, time.monotonic()
                    outcomes.append(self._call(item, t, p, t.method, got))
                    durations.append(time.monotonic() - began)
                    ran += 1
                    continue
                spec = specs.get(p + "spec:" + t.path)
                if spec is None:
                    log.warning("buried continuation %s: its spec is gone from the store",
                                job_id(t.name, t.gen, t.path))
                    outcomes.append(Outcome(item, t, p, "bury"))
                    continue
                STATS.current, began = t, time.monotonic()
                outcomes.append(self._run_continuation(item, t, p, spec, recs, got, trail))
                durations.append(time.monotonic() - began)
                ran += 1
            else:
                continue
            break  # handed back the rest of the batch
        STATS.current = None
        if len(durations) > 4096:  # (no beat takes them: the registry is off, or its thread is stuck)
            STATS.tally()
        took = (time.monotonic() - started) / max(ran, 1)
        for method in {tasks[0].method for _, _, tasks in bundles if tasks[0].method is not None}:
            self._speed[method] = 0.5 * self._speed.get(method, took) + 0.5 * took
        self.commit_safely(outcomes)
        return ran

    def _fetch(self, bundles: list[Bundle]) -> tuple[dict[str, bytes], dict[str, Spec],
                                                     dict[str, tuple[Any, ...]], list[str]]:
        """In one bulk get, what the batch needs (run counters, cancel flags,
        runner blobs not cached, continuation specs; for a lone job, its value
        and commit marker), then the records of the continuations' inputs: the
        values, the specs, the records and the ids their references passed through."""
        keys: set[str] = set()
        for _, p, tasks in bundles:
            first = tasks[0]
            keys.update((p + "total", p + "cancel"))
            if len(tasks) == 1:  # a lone job may be a re-delivery of a completed one
                keys.update((p + "v:" + first.path, p + "cm:" + first.path))
            if first.method is None:
                keys.update(p + "spec:" + t.path for t in tasks)
            if first.digest not in self._runners:
                keys.add(blob_key(first.digest))
        got = gather(self.store, self.signer, self.store.get_many(list(keys)))
        specs = {}  # spec key -> Spec
        for _, p, tasks in bundles:
            if tasks[0].method is None:
                for t in tasks:
                    raw = got.get(p + "spec:" + t.path)
                    if raw is not None:
                        specs[p + "spec:" + t.path] = Spec(**self.signer.loads(raw))
        inputs = sorted({i for s in specs.values() for i in s.inputs})
        trail: list[str] = []
        recs = records(self.store, self.signer, inputs, trail) if inputs else {}
        return got, specs, recs, trail

    def _settled(self, item: Reserved, p: str, tasks: list[Task], got: dict[str, bytes],
                 specs: dict[str, Spec]) -> list[Outcome] | None:
        """The outcomes of a bundle that does not run, or None: its run has no
        state (buried), is cancelled (acked), or it is a completed job delivered
        again (acked, and its continuations made sure of: ``_recovery``; one that
        enqueued runs again: it may have died before it queued its children)."""
        first = tasks[0]
        if p + "total" not in got:
            log.warning("buried %d job(s) from %s: run %r has no state in the store (lost or forgotten)",
                        len(tasks), job_id(first.name, first.gen, first.path), first.name)
            return [Outcome(item, t, p, "bury") for t in tasks]
        if p + "cancel" in got:
            return [Outcome(item, t, p, "ack") for t in tasks]
        if len(tasks) == 1 and p + "v:" + first.path in got and p + "cm:" + first.path not in got:
            return [Outcome(item, first, p, "again", spec=specs.get(p + "spec:" + first.path))]
        return None

    def _isolate_suspects(self, items: Sequence[Reserved]) -> Sequence[Reserved]:
        """A queue item whose holder died with it runs alone: the rest of the
        batch goes back at once, so that if it kills this worker too, only it
        is blamed (a released item is not a crash)."""
        if len(items) < 2:
            return items
        suspect = next((item for item in items if item.crashes), None)
        if suspect is None:
            return items
        for item in items:
            if item is not suspect:
                self.queue.release(item.handle, 0.0)
        return [suspect]

    def _set_aside_crashers(self, bundles: list[Bundle], outcomes: list[Outcome], got: dict[str, bytes],
                            specs: dict[str, Spec]) -> list[Bundle]:
        """Deal with queue items whose holder died with them: a bundle is split
        into one item per job (so the next death names its job); a lone job that
        killed its worker ``max_crashes`` times fails for good.  The rest run."""
        keep = []
        for bundle in bundles:
            item, p, tasks = bundle
            if not item.crashes:
                keep.append(bundle)
                continue
            t = tasks[0]
            if len(tasks) > 1:
                log.warning("a worker died holding %d jobs from %s on; each goes back alone", len(tasks),
                            job_id(t.name, t.gen, t.path))
                outcomes.extend(Outcome(item, tt, p, "split") for tt in tasks)
                continue
            limit = self._max_crashes(t.digest, got)
            if item.crashes < limit:
                log.warning("job %s: a worker died running it (%d of %d allowed); running it again",
                            job_id(t.name, t.gen, t.path), item.crashes, limit)
                keep.append(bundle)
                continue
            spec = specs.get(p + "spec:" + t.path)
            record = packmule_failure(
                t, spec, "WorkerCrashed",
                f"the job's worker process died {item.crashes} times while it ran it (a signal, os._exit, a crash "
                "in native code, or out of memory); it is set aside and will not run again. Run the method in a "
                "plain Python process to see why, or raise max_crashes on the runner class if the deaths were "
                "not its fault")
            outcomes.append(Outcome(item, t, p, "done", record, spec=spec))
        return keep

    def _max_crashes(self, digest: str, got: dict[str, bytes]) -> int:
        try:
            return int(getattr(self.runner(digest, got), "max_crashes", MAX_CRASHES))
        except Exception:  # the runner cannot be loaded: its job fails anyway when it runs
            return MAX_CRASHES

    def _split_unknown(self, bundles: list[Bundle], outcomes: list[Outcome]) -> None:
        """Of a bundle whose method is not known to be quick, keep the first job
        and hand the rest back (as one new bundle) for any worker to take."""
        for item, p, tasks in bundles:
            method = tasks[0].method
            if len(tasks) > 1 and method is not None and self._speed.get(method, 1.0) >= FAST:
                outcomes.extend(Outcome(item, t, p, "handback") for t in tasks[1:])
                del tasks[1:]

    def _call(self, item: Reserved, t: Task, p: str, method: str, got: dict[str, bytes],
              lead: tuple[Any, ...] = ()) -> Outcome:
        try:
            runner = self.runner(t.digest, got)
            why = refusal(type(runner), method)
            fn: Callable[..., Any] | None = getattr(runner, method) if why is None else None
        except Exception as exc:
            info = failure_info(t, method, "<not loaded>", exc)
            log.warning("job %s cannot be loaded: %s: %s", info["job"], info["exc_type"], info["message"])
            return Outcome(item, t, p, "raised", ("err", info))
        if fn is None:  # an old or crafted body, correctly signed: fails, never called
            return Outcome(item, t, p, "done", packmule_failure(t, None, "RefusedMethod", f"not run: {why}"))
        ctx = JobContext(self.backend, t, item.handle)
        token = current.set(ctx)
        try:
            value = fn(*lead, *t.args, **t.kwargs)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: job code cannot end its worker
            shown = (*lead, *t.args) if not lead else ("<values>", *t.args)
            return Outcome(item, t, p, "raised", ("err", failure_info(t, method, shown, exc)))
        finally:
            current.reset(token)
        if issubclass(type(value), JobRef):  # (type(): a value's own __class__ may raise)
            try:
                name, gen, path = parse_job_id(value[0])
            except ValueError as exc:  # (JobRef.fast, or a tuple forced into one): every reader would choke
                return Outcome(item, t, p, "done", packmule_failure(t, None, "BadJobRef", f"it returned {exc}"))
            if (name, gen) == (t.name, t.gen) and path in ctx.deferreds:
                return Outcome(item, t, p, "done", None, ctx, handoff=path)
            return Outcome(item, t, p, "done", ("ref", value.id), ctx)
        return Outcome(item, t, p, "done", ("ok", value), ctx)

    def _run_continuation(self, item: Reserved, t: Task, p: str, spec: Spec, recs: dict[str, tuple[Any, ...]],
                          got: dict[str, bytes], trail: list[str]) -> Outcome:
        values = []
        for ref_id in spec.inputs:
            rec = recs.get(ref_id)
            if rec is None:
                return Outcome(item, t, p, "poll", spec=spec)
            if rec[0] == "err":
                info = dict(rec[1])
                via = info.get("via", "")
                info["via"] = (f"deferred_result {spec.method} ({job_id(t.name, t.gen, t.path)}) "
                               f"got the failed input {ref_id}\n" + via)
                return Outcome(item, t, p, "done", ("err", info), spec=spec)
            if rec[0] == "gone":
                info = {"job": job_id(t.name, t.gen, t.path), "method": spec.method, "args": "",
                        "exc_type": "ValuesNotRecorded",
                        "message": f"input {ref_id} was already consumed by another deferred_result "
                                   "and record_return_values is False", "traceback": ""}
                return Outcome(item, t, p, "done", ("err", info), spec=spec)
            values.append(rec[1])
        args, kwargs = spec.call
        call_task = t._replace(args=args, kwargs=kwargs, digest=spec.digest)
        out = self._call(item, call_task, p, spec.method, got, lead=(values,))
        out.task, out.spec = t, spec
        if not spec.record:
            out.consumed = [value_key(i) for i in spec.inputs] + [value_key(i) for i in trail]
        return out

    # --- committing --------------------------------------------------------------
    def commit(self, outcomes: list[Outcome]) -> None:
        """Commit a batch's effects, in the order that loses nothing when the
        worker dies anywhere: values and the hand-offs of completed continuations
        (the adds that decide which execution completes a job), the counts, the
        failure list and commit markers, then the queue (children, ready
        continuations, acks).  What a job's earlier execution may have left
        undone is made sure of before the queue (``packmule._worker.recovery``)."""
        self.watchdog.settle()
        self._settle_raised(outcomes)
        adds, valued, enqueued = self._stage(outcomes)
        won = self.store.add_many(spill_values(self.store, self.signer, adds, self.ttl), self.ttl) if adds else set()
        if FAULTS:
            _fault("after_add")
        counts = self._count(won, valued, enqueued)
        if counts.handoffs:  # inputs consumed (marked gone) before the counts: the run is as it ends when complete
            self.store.set_many(counts.handoffs, self.ttl)
        results = self.store.incr_many(counts.deltas) if counts.deltas else {}
        if FAULTS:
            _fault("after_counts")
        for key, delta in counts.deltas.items():
            if key.endswith(("/done", "/failed")):  # (the totals a dashboard shows: jobs this worker completed)
                STATS.counted(key.rpartition("/")[2], delta)
        later, failures = self._fired(results, counts)
        if failures or counts.counted:  # the failure list; the markers that say which children total counts
            self.store.set_many({**failures, **counts.counted}, self.ttl)
        later += self._children(enqueued, counts.counted)
        # (a bundle split after its worker died: at once, so that the continuation
        # goes in the queue before the jobs, and they find it done)
        again = [o for o in outcomes if o.kind in ("again", "split")] + counts.lost
        if again:
            queued = {(t.name, t.gen, t.path) for t in later}
            later += [t for t in _recovery.ready_again(self.backend, again, self._continuation_task)
                      if (t.name, t.gen, t.path) not in queued]
        if log.isEnabledFor(logging.INFO):
            log_outcomes(outcomes)
        self._finish_queue(outcomes, later)

    def _fired(self, results: dict[str, int | None], counts: Counts) -> tuple[list[Task], dict[str, bytes]]:
        """From the counters' new values: the continuations this commit's counts
        completed, and the failure list's entries (``f:<k>`` -> path of the k-th
        failed job of its run)."""
        later: list[Task] = []
        failures: dict[str, bytes] = {}
        for key, value in results.items():
            if value is None:
                log.warning("run state lost: counter %s is gone from the store", key)
            elif key in counts.fire and value == counts.fire[key][0]:
                later.append(counts.fire[key][1])
            elif key.endswith("/failed"):
                p = key[: -len("failed")]
                paths = counts.failed_paths[p]
                failures.update((f"{p}f:{value - len(paths) + 1 + i}", path.encode()) for i, path in enumerate(paths))
        return later, failures

    def _children(self, enqueued: list[Outcome], counted: dict[str, bytes]) -> list[Task]:
        """The jobs and polled continuations that the jobs of ``enqueued`` queue.
        A job that lost the add of its commit marker queues them only once
        ``total`` surely counts them (``_recovery.ensure_counted``); if that cannot
        be made sure of now, the job comes back later instead."""
        unsure = [o for o in enqueued if o.ctx is not None and o.ctx.children
                  and o.p + "cm:" + o.task.path not in counted]
        held = _recovery.ensure_counted(self.backend, self.signer, self.ttl, unsure) if unsure else set()
        later: list[Task] = []
        for o in enqueued:
            assert o.ctx is not None
            if id(o) in held:
                o.kind, o.record = "retry", (RECOMMIT_DELAY * self.delay_scale,)
                continue
            later += o.ctx.children
            later += [self._continuation_task(o.task, path)
                      for path, spec in o.ctx.deferreds.items() if spec.counted == 0]
        return later

    def _stage(self, outcomes: list[Outcome]) -> tuple[dict[str, bytes | int], list[tuple[str, Outcome]],
                                                       list[Outcome]]:
        """What the batch adds to the store: each completed job's value record,
        and for a job that enqueued, its commit marker, runner blobs and its
        continuations' specs; for a continuation, the reference to its value
        that each job that returned it gets (after the values: a reader that
        finds the reference finds the value).  Also which outcomes store a
        value, and which enqueued."""
        adds: dict[str, bytes | int] = {}
        valued: list[tuple[str, Outcome]] = []  # (value key, outcome) of those that store a value
        enqueued: list[Outcome] = []  # those that enqueued jobs or continuations
        for o in outcomes:
            if o.kind != "done":
                continue
            t, p, ctx = o.task, o.p, o.ctx
            if ctx is not None and (ctx.children or ctx.deferreds):
                enqueued.append(o)
                adds.update((blob_key(d), b) for d, b in ctx.blobs.items())
                adds[p + "cm:" + t.path] = b"%d" % ctx.position  # (how a recount finds its children)
                for path, spec in ctx.deferreds.items():
                    if path == o.handoff:
                        own = o.spec.finishes if o.spec else []
                        spec.finishes = [*own, (t.path, t.method is not None)]
                        spec.watchers = spec.watchers + self._watchers(o)
                    adds[p + "n:" + path] = 0
                    adds[p + "spec:" + path] = self.signer.dumps(vars(spec))
            if o.handoff is None:
                valued.append((p + "v:" + t.path, o))
        adds.update(zip([key for key, _ in valued], self.signer.sign_many(map(self._stored, valued)),
                        strict=True))
        for _, o in valued:
            if o.spec is not None and o.spec.finishes:
                ref = self.signer.dumps(self._ref(o.task))
                adds.update((o.p + "v:" + path, ref) for path, _ in o.spec.finishes)
        return adds, valued, enqueued

    def _ref(self, t: Task) -> tuple[str, str]:
        return ("ref", job_id(t.name, t.gen, t.path))

    def _count(self, won: set[str], valued: list[tuple[str, Outcome]], enqueued: list[Outcome]) -> Counts:
        """The counts the adds this worker won stand for: ``total`` for the
        children of a job whose enqueues it committed first; ``done``/``failed``
        and the watchers' arrived counters for the jobs it completed first (a
        continuation: those it finishes, whose reference it added or found)."""
        c = Counts(defaultdict(int), {}, {}, defaultdict(list), {}, [])
        finished: dict[str, int] = defaultdict(int)  # run prefix -> jobs done for good
        for o in enqueued:
            key = o.p + "cm:" + o.task.path
            if o.ctx is not None and o.ctx.children and key in won:
                won.discard(key)  # a job twice in one batch counts once
                c.deltas[o.p + "total"] += len(o.ctx.children)
                c.counted[key] = _recovery.mark(o.ctx.position)
        handed = self._handed(won, valued)
        for key, o in valued:
            if key not in won:
                c.lost.append(o)  # another execution completed this job
                continue
            won.discard(key)
            t, p = o.task, o.p
            assert o.record is not None
            failed = o.record[0] == "err"
            if o.spec is None:  # a job: it finishes itself
                finished[p] += 1
                if failed:
                    c.failed_paths[p].append(t.path)
                watchers: Sequence[tuple[str, int]] = t.watchers
            else:  # a continuation finishes the jobs that handed their value to it
                jobs = [path for path, is_job in o.spec.finishes if is_job and p + "v:" + path in handed]
                finished[p] += len(jobs)
                if failed:
                    c.failed_paths[p] += jobs
                watchers = o.spec.watchers
            for w_path, expected in watchers:
                c.deltas[p + "n:" + w_path] += 1
                c.fire[p + "n:" + w_path] = (expected, self._continuation_task(t, w_path))
            if o.consumed:
                gone = self.signer.dumps(GONE)
                c.handoffs.update((k, gone) for k in o.consumed)
        for p, count in finished.items():
            c.deltas[p + "done"] += count
        for p, paths in c.failed_paths.items():
            c.deltas[p + "failed"] += len(paths)
        return c

    def _handed(self, won: set[str], valued: list[tuple[str, Outcome]]) -> set[str]:
        """The value keys of the jobs that the continuations this batch completed
        first finish: those whose reference this batch added, and those where
        another execution of the continuation added it first.  Not one whose
        value was there before (void: its enqueue was taken back; or a value of
        its own an earlier execution stored and counted)."""
        refs: dict[str, tuple[str, str]] = {}
        for key, o in valued:
            if o.spec is not None and key in won:
                refs.update((o.p + "v:" + path, self._ref(o.task)) for path, _ in o.spec.finishes)
        handed = {key for key in refs if key in won}
        lost = [key for key in refs if key not in won]
        for key, raw in gather(self.store, self.signer, self.store.get_many(lost)).items() if lost else ():
            with contextlib.suppress(Exception):  # (a value that cannot be read is not this reference)
                if self.signer.loads(raw) == refs[key]:
                    handed.add(key)
        return handed

    def commit_safely(self, outcomes: list[Outcome]) -> None:
        """``commit``; if the store or the queue refuses what a batch produced (not
        an outage: that is for the caller to ride out), commit each queue item
        alone, and turn the jobs of an item that is still refused into failures,
        so that one bad job never wedges a worker or its run."""
        try:
            self.commit(outcomes)
            return
        except BackendUnavailable:
            raise
        except Exception as exc:
            if len({id(o.item) for o in outcomes}) == 1:
                self._commit_refused(outcomes, exc)
                return
        by_item: dict[int, list[Outcome]] = defaultdict(list)
        for o in outcomes:
            by_item[id(o.item)].append(o)
        for group in by_item.values():
            try:
                self.commit(group)
            except BackendUnavailable:
                raise
            except Exception as exc:
                self._commit_refused(group, exc)

    def _commit_refused(self, group: list[Outcome], exc: Exception) -> None:
        """The commit of one queue item's jobs failed with ``exc``: they fail for
        good, with that cause (their enqueues dropped); if even that cannot be
        committed, the item goes back to the queue for a later try."""
        log.warning("the commit of %d job(s) failed: %r; they fail for good", len(group), exc)
        for o in group:
            if o.kind in ("done", "raised", "retry"):
                o.kind, o.ctx, o.handoff, o.consumed = "done", None, None, []
                o.record = packmule_failure(o.task, o.spec, type(exc).__name__,
                                            f"its result could not be committed: {exc}")
        try:
            self.commit(group)
        except BackendUnavailable:
            raise
        except Exception:
            log.exception("the failure of %d job(s) could not be committed either; their queue item goes "
                          "back to the queue in %.0fs", len(group), RECOMMIT_DELAY)
            with contextlib.suppress(Exception):
                self.queue.release(group[0].item.handle, RECOMMIT_DELAY)

    def _stored(self, entry: tuple[str, Outcome]) -> bytes:
        """The pickled value record of a completed job.  A value that cannot be
        pickled, or unpickled again, or is larger than packmule carries, makes the
        job a failure that says so (the job is not retried: its next run would
        return the same).  A value unpickled nowhere could wedge every reader."""
        o = entry[1]
        assert o.record is not None
        value = o.record[1] if o.record[0] == "ok" else None
        how = "pickled"
        try:
            data = dumps(o.record)
            how = "unpickled again"
            if not _immutable(value):  # (plain immutable data always loads: no trial for it)
                pickle.loads(data)
        except BaseException as exc:  # (a value's own __reduce__ or __setstate__ may raise anything)
            shown = describe(exc)
            o.record = packmule_failure(o.task, o.spec, "UnstorableValue",
                                        f"its return value ({type(value).__name__}) cannot be {how}: "
                                        f"{shown.exc_type}: {shown.message}; return values must be picklable "
                                        "by cloudpickle (return plain data, not locks, sockets, files or generators)")
            return dumps(o.record)
        limit = self.max_payload
        if len(data) > limit:
            o.record = packmule_failure(o.task, o.spec, "UnstorableValue",
                                        f"its return value is {len(data):,} bytes pickled, over packmule's limit "
                                        f"of {limit:,} bytes (PACKMULE_MAX_PAYLOAD); return a smaller value, e.g. "
                                        "the path or key of data kept elsewhere")
            return dumps(o.record)
        return data

    def _settle_raised(self, outcomes: list[Outcome]) -> None:
        """Count the failed attempt of each job that raised: retry it (with
        backoff) or turn it into a failure for good."""
        raised = [o for o in outcomes if o.kind == "raised"]
        if not raised:
            return
        keys = {o.p + "try:" + o.task.path: o for o in raised}
        self.store.add_many({k: 0 for k in keys}, self.ttl)
        tries = self.store.incr_many({k: 1 for k in keys})
        for key, o in keys.items():
            attempt = tries.get(key) or 1
            assert o.record is not None
            info = o.record[1]
            limit = o.spec.max_retries if o.spec else o.task.max_retries
            if attempt <= limit:
                base = o.spec.retry_delay if o.spec else o.task.retry_delay
                delay = min(base * 2 ** (attempt - 1), MAX_BACKOFF) * self.delay_scale
                log.warning("job %s raised %s: %s; retry %d of %d in %.1fs", info["job"], info["exc_type"],
                            info["message"], attempt, limit, delay)
                o.kind, o.record = "retry", (delay,)
                STATS.counted("retried", 1)
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
                elif o.kind in ("done", "ack", "again"):
                    acks.append(handle)
                else:
                    poll = POLL_DELAY * self.delay_scale
                    delay = o.record[0] if o.kind == "retry" and o.record else poll if o.kind == "poll" else 0.0
                    releases.append((handle, delay))
                continue
            later += [o.task for o in group if o.kind == "handback"]
            for o in group:
                if o.kind == "split":  # an item of its own: a later death names this job
                    delayed += encode(self.signer, [o.task])
            for o in group:
                if o.kind == "retry":  # alone, after its backoff
                    assert o.record is not None
                    delayed += [put._replace(delay=o.record[0]) for put in encode(self.signer, [o.task])]
            acks.append(handle)
        puts = encode(self.signer, later) + delayed
        if puts:
            self.queue.put_many(spill_bodies(self.backend, self.signer, puts, self.ttl))
        for handle, delay in releases:
            self.queue.release(handle, delay)
        for handle in buries:
            self.queue.bury(handle)
        if acks:
            self.queue.ack_many(acks)


STATES = {"done": "done", "ack": "dropped (cancelled)", "again": "dropped (done before)",
          "bury": "buried (run state gone)",
          "handback": "handed back", "poll": "waiting for its inputs", "retry": "retrying"}


def log_outcomes(outcomes: Sequence[Outcome]) -> None:
    """One line per job state change, at INFO (failures are logged at WARNING
    where they happen)."""
    for o in outcomes:
        failed = o.kind == "done" and o.record is not None and o.record[0] == "err"
        state = "failed" if failed else STATES.get(o.kind, o.kind)
        if o.kind == "retry" and o.record:
            state = f"retrying in {o.record[0]:.1f}s"
        log.info("run %s job %s %s: %s", o.task.name, o.task.id, o.task.method or "(continuation)", state)

