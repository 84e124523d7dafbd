"""The commit of a batch's effects (``Committer``, a base of ``Engine``): in a few
bulk store calls, in the order that loses nothing when the worker dies anywhere:
values and hand-offs (the adds that decide which execution completes a job),
then the counts, the failure list and commit markers, then the queue (children,
ready continuations, acks).  A batch that the store or queue refuses is
committed item by item; a job's failed attempt is retried with backoff.

Why effects count exactly once with jobs that may run twice: see ``packmule._worker.engine``."""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from packmule._core.errors import BackendUnavailable
from packmule._core.tracebacks import describe
from packmule._model import placement as _placement
from packmule._model.job import FAULTS, fault
from packmule._model.keys import blob_key, job_id
from packmule._model.records import GONE
from packmule._model.registry import STATS
from packmule._model.wake import Wakes
from packmule._transport.codec import Signer, dumps
from packmule._transport.spill import gather, spill_values
from packmule._transport.wire import Task, encode
from packmule._worker import recovery as _recovery
from packmule._worker.outcomes import Counts, Outcome, log_outcomes, packmule_failure
from packmule._worker.runner_maker import immutable
from packmule._worker.watchdog import Watchdog
from packmule.backends.base import Backend, Put

__all__ = ["MAX_BACKOFF", "POLL_DELAY", "RECOMMIT_DELAY", "Committer"]

log = logging.getLogger("packmule")

POLL_DELAY = 0.25  # s: a continuation whose inputs are not all done checks again after this
MAX_BACKOFF = 300.0  # s: the longest retry delay
RECOMMIT_DELAY = 5.0  # s before a queue item whose commit failed twice is tried again


class Committer:
    """The commit phases of ``Engine`` (which sets these attributes)."""

    backend: Backend
    queue: Any
    store: Any
    signer: Signer
    ttl: float
    watchdog: Watchdog
    max_payload: int
    delay_scale: float
    wakes = Wakes()  # the batch's waiting drivers (``_model.wake``)

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
            fault("after_add")
        counts = self._count(won, valued, enqueued)
        if counts.handoffs:  # inputs consumed (marked gone) before the counts: the run is as it ends when complete
            self.store.set_many(counts.handoffs, self.ttl)
        self.wakes.reread(self.store)  # (a driver may have armed while the batch ran)
        results = self._count_failures(counts)  # (before done: a run that reads complete lists its failures)
        rest = {key: delta for key, delta in counts.deltas.items() if key not in results}
        results.update(self.store.incr_many(rest) if rest else {})
        if FAULTS:
            fault("after_counts")
        self.wakes.wake_crossed(self.queue, results, counts.deltas)
        for key, delta in counts.deltas.items():
            if key.endswith(("/done", "/failed")):  # (the totals a dashboard shows: jobs this worker completed)
                STATS.counted(key.rpartition("/")[2], delta)
        later = self._fired(results, counts)
        if counts.counted:  # the markers that say which children total counts
            self.store.set_many(counts.counted, self.ttl)
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

    def _count_failures(self, counts: Counts) -> dict[str, int | None]:
        """Count the jobs this commit failed for good in their runs' ``failed``,
        then write the failure list's entries (``f:<k>`` -> path of the k-th
        failed job of its run), before ``done`` counts those jobs, so that a run
        that reads complete lists every failure.  The counters' new values."""
        deltas = {key: delta for key, delta in counts.deltas.items() if key.endswith("/failed")}
        if not deltas:
            return {}
        results: dict[str, int | None] = self.store.incr_many(deltas)
        failures: dict[str, bytes] = {}
        for key, value in results.items():
            if value is not None:
                p = key[: -len("failed")]
                paths = counts.failed_paths[p]
                failures.update((f"{p}f:{value - len(paths) + 1 + i}", path.encode()) for i, path in enumerate(paths))
        if failures:
            self.store.set_many(failures, self.ttl)
        return results

    def _fired(self, results: dict[str, int | None], counts: Counts) -> list[Task]:
        """From the counters' new values: the continuations this commit's counts completed."""
        later: list[Task] = []
        for key, value in results.items():
            if value is None:
                log.warning("run state lost: counter %s is gone from the store", key)
            elif key in counts.fire and value == counts.fire[key][0]:
                later.append(counts.fire[key][1])
        return later

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
                adds.update((blob_key(p, d), b) for d, b in ctx.blobs.items())
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
                if any(child.due for child in o.ctx.children):  # (delayed: counted in `held` until done)
                    c.deltas[o.p + "held"] += sum(1 for child in o.ctx.children if child.due)
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
                if t.due:  # (a delayed job is no longer held)
                    c.deltas[p + "held"] -= 1
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
            if not immutable(value):  # (plain immutable data always loads: no trial for it)
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
        return parent._replace(path=path, method=None, args=(), kwargs={}, watchers=(), due=0.0)

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
            _placement.put(self.backend, self.signer, puts, self.ttl)
        for handle, delay in releases:
            self.queue.release(handle, delay)
        for handle in buries:
            self.queue.bury(handle)
        if acks:
            self.queue.ack_many(acks)
