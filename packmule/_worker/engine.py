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

This module runs the batch; ``packmule._worker.commit`` commits it (``Engine``'s base).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from packmule._core import config as _config
from packmule._core.errors import BackendUnavailable
from packmule._core.types import JobRef
from packmule._model import job as _job
from packmule._model import wake as _wakes
from packmule._model.job import HOOKS, JobContext, Spec, current
from packmule._model.keys import blob_key, job_id, parse_job_id, prefix, rejected_key, value_key
from packmule._model.methods import refusal
from packmule._model.records import records
from packmule._model.registry import STATS
from packmule._model.timing import hold_until_due
from packmule._transport.codec import Forged, Signer
from packmule._transport.spill import gather, gather_one
from packmule._transport.wire import Task, decode
from packmule._worker.commit import Committer
from packmule._worker.outcomes import Bundle, Outcome, failure_info, packmule_failure
from packmule._worker.runner_maker import RunnerMaker
from packmule._worker.watchdog import Watchdog
from packmule.backends.base import Backend, Reserved

__all__ = ["HANDBACK_AFTER", "MAX_CRASHES", "REJECTED_TTL", "UNREACHABLE_BURY", "Engine"]

log = logging.getLogger("packmule")

HANDBACK_AFTER = 0.05  # s: a batch running longer hands its unstarted jobs back
UNREACHABLE_MAX = 30.0  # s at most between tries of a job whose run's store server is away
UNREACHABLE_BURY = 60.0  # s a store server may be away before the jobs of its runs are buried
REJECTED_TTL = 3600.0  # s a note that jobs were refused for their signature stays in the store
MAX_CRASHES = 3  # deaths of its worker a job may cause before it fails for good (Runner.max_crashes)


class Engine(Committer):
    """Runs batches of reserved jobs for one backend, in one worker process."""

    def __init__(self, backend: Backend, ttl: float) -> None:
        self.backend, self.ttl = backend, ttl
        self.signer = Signer(backend.secret())
        self.queue, self.store = backend.queue, backend.store
        self.watchdog = _job.watchdog = Watchdog(backend.queue)
        self._runners: dict[str, RunnerMaker] = {}
        # (runner class, method) -> why it is no job method, or None: ``refusal`` asks each of
        # packmule's runner classes (Runner and its mixins), once per class and method, not per job
        self._refusals: dict[tuple[type, str], str | None] = {}
        self._speed: dict[str, float] = {}  # method -> recent seconds per job, in this process
        self._unreachable: dict[str, tuple[float, str]] = {}  # store server away -> (first deferral, a tag of it)
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
            except BackendUnavailable as exc:  # (its body is in chunks on a store server away now)
                log.warning("job %s on %s goes back to the queue: %s", item.handle, item.server, exc)
                self.queue.release(item.handle, 1.0)
            except Exception as exc:
                log.warning("buried job %s on %s: unreadable body: %r", item.handle, item.server, exc)
                self.queue.bury(item.handle)
        if rejected:
            self.store.set_many(rejected, REJECTED_TTL)
        return out

    def runner(self, digest: str, got: dict[str, bytes], p: str) -> Any:
        """A fresh runner object for a job of the run generation ``p``: unpickled
        once per digest (its blob is in ``got`` when not cached), then copied per job."""
        maker = self._runners.get(digest)
        if maker is None:
            blob = got.get(blob_key(p, digest))
            if blob is None:
                raise LookupError(f"runner {digest} is gone from the store")
            if len(self._runners) >= 1024:
                self._runners.clear()
                self._refusals.clear()
            maker = self._runners[digest] = RunnerMaker(self.signer.loads(blob), self.backend)
        return maker()

    def _defer_unreachable(self, bundles: list[Bundle]) -> list[Bundle]:
        """Bundles of runs whose state is on a store server this process has set
        aside go back to the queue unrun, to be tried again later: after a
        second at first, and at most every UNREACHABLE_MAX seconds.  Should the
        server come back, they run (should it come back empty, their run has no
        state and they are dropped as such).  Once it has been away for
        UNREACHABLE_BURY seconds (scaled by PACKMULE_DELAY_SCALE) they are
        buried instead: a memcached that died comes back empty, and jobs
        deferred for ever would keep the queue busy, so that waits could never
        tell that nothing of their runs is left on the live servers (an
        operator who brings the server back with its data kicks them).  The
        other runs' jobs never wait for them."""
        keep = []
        now = time.monotonic()
        for holder in [h for h, (_, tag) in self._unreachable.items() if self.store.placeable(tag)]:
            del self._unreachable[holder]  # (back: its next outage starts at a second again)
        for bundle in bundles:
            tag = bundle.tasks[0].gen
            if self.store.placeable(tag):
                keep.append(bundle)
                continue
            holder = self.store.holder(tag) or ""
            first = self._unreachable.setdefault(holder, (now, tag))[0]
            if now - first < UNREACHABLE_BURY * self.delay_scale:
                self.queue.release(bundle.item.handle, min(UNREACHABLE_MAX, max(1.0, now - first)))
                continue
            t = bundle.tasks[0]
            log.warning("buried %d job(s) from %s: the state of run %r is on the store server %s, away for %.0fs "
                        "(`packmule status` counts them as buried; kick them if it comes back with its data)",
                        len(bundle.tasks), job_id(t.name, t.gen, t.path), t.name, holder, now - first)
            self.queue.bury(bundle.item.handle)
        return keep

    # --- running ---------------------------------------------------------------
    def run_batch(self, items: Sequence[Reserved]) -> int:
        """Run and commit a batch; returns how many tasks ran user code."""
        items = self._isolate_suspects(items)
        bundles = self._defer_unreachable(self.decode(items))
        if not bundles:
            return 0
        hold_until_due(tasks[0].due for _, _, tasks in bundles)
        for item, _, tasks in bundles:
            self.watchdog.hold(item.handle, tasks[0].ttr)
        got, specs, recs, trail = self._fetch(bundles)
        self.wakes = _wakes.Wakes(got, {p for _, p, _ in bundles})
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
            keys.update((p + "total", p + "cancel", p + "wake"))
            if len(tasks) == 1:  # a lone job may be a re-delivery of a completed one
                keys.update((p + "v:" + first.path, p + "cm:" + first.path))
            if first.method is None:
                keys.update(p + "spec:" + t.path for t in tasks)
            if first.digest not in self._runners:
                keys.add(blob_key(p, first.digest))
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
            limit = self._max_crashes(t.digest, got, p)
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

    def _max_crashes(self, digest: str, got: dict[str, bytes], p: str) -> int:
        try:
            return int(getattr(self.runner(digest, got, p), "max_crashes", MAX_CRASHES))
        except Exception:  # the runner cannot be loaded: its job fails anyway when it runs
            return MAX_CRASHES

    def _split_unknown(self, bundles: list[Bundle], outcomes: list[Outcome]) -> None:
        """Of a bundle whose method is not known to be quick, keep what this
        worker runs within HANDBACK_AFTER at the method's recent speed (one job
        if unknown) and hand the rest back at once, as one new bundle, for any
        worker to take: the others are never idle while it holds them, and a
        bundle of 4 ms jobs is put back once per 12 jobs, not once per job."""
        for item, p, tasks in bundles:
            method = tasks[0].method
            if len(tasks) > 1 and method is not None:
                keep = max(1, int(HANDBACK_AFTER / max(self._speed.get(method, 1.0), 1e-6)))
                if keep < len(tasks):
                    outcomes.extend(Outcome(item, t, p, "handback") for t in tasks[keep:])
                    del tasks[keep:]

    def _call(self, item: Reserved, t: Task, p: str, method: str, got: dict[str, bytes],
              lead: tuple[Any, ...] = ()) -> Outcome:
        try:
            runner = self.runner(t.digest, got, p)
            key = (type(runner), method)
            why = self._refusals[key] if key in self._refusals else self._refusals.setdefault(key, refusal(*key))
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
            for hook in HOOKS.before:  # (a framework's: packmule._model.job.HOOKS)
                hook()
            value = fn(*lead, *t.args, **t.kwargs)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: job code cannot end its worker
            shown = (*lead, *t.args) if not lead else ("<values>", *t.args)
            return Outcome(item, t, p, "raised", ("err", failure_info(t, method, shown, exc)))
        finally:
            current.reset(token)
            if HOOKS.after:
                _after_job(t)
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


def _after_job(t: Task) -> None:
    for hook in HOOKS.after:
        try:
            hook()
        except Exception:  # (the job's outcome stands)
            log.exception("an after-job hook failed after job %s", job_id(t.name, t.gen, t.path))
