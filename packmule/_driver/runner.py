"""``Runner``: the class users subclass.  Everything here is the driver's side;
the worker's side is ``packmule._worker.engine``."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import cloudpickle

from packmule._core import config as _config
from packmule._core.errors import (
    BackendUnavailable,
    Cancelled,
    NotReady,
    NoWorkers,
    RunStateLost,
    SecretMismatch,
    ValuesNotRecorded,
)
from packmule._core.types import JobRef, Progress
from packmule._driver import dashboard as _dashboard
from packmule._model import census as _census
from packmule._model import registry as _registry
from packmule._model.keys import blob_key, check_name, parse_job_id, pointer, prefix, user_lock, value_keys
from packmule._model.methods import FRAMEWORK, refusal
from packmule._model.records import GONE, VOID, RunState, progress_of, records, ref_for, unwrap
from packmule._transport.codec import Signer, dumps
from packmule._transport.spill import gather, spill_bodies, spill_values
from packmule._transport.wire import BUNDLE, Entries, Task, count, expand, pack, shard
from packmule._worker.engine import JobContext, Spec, current
from packmule._worker.watchdog import Watchdog
from packmule.backends.base import Backend, Put

log = logging.getLogger("packmule")

POLL_MIN, POLL_MAX = 0.001, 0.1  # s: how often a blocking wait looks again
NO_WORKERS_WARN, NO_WORKERS_RAISE = 2.0, 6.0  # s without a worker while jobs wait
STILL_WAITING_EVERY = 30.0  # s: a long wait says what it waits for
OUTAGE_GRACE = 30.0  # s a wait rides out an unreachable server before it raises
STALLED_AFTER = 3.0  # s with an empty queue and an incomplete run before a wait gives up
REJECTED_BEFORE = 60.0  # s: a refusal this long before a wait began still concerns it (clocks differ)
RECOUNT_AFTER_MAX = 300.0  # s: the longest a wait goes without progress before it recounts again
PUSH_EVERY = 0.25  # s: push_progress_updates refresh period
READ_CHUNK = 1000  # values a blocking deferred_result reads at a time, once that many jobs are done
_stored_blobs: set[tuple[int, str]] = set()  # (id(store), digest) this process has stored (a fork child
#                                               keeps it: what its parent stored is in the same store)


@functools.cache
def signer_for(backend: Backend) -> Signer:
    return Signer(backend.secret())


class Runner:
    """Subclass me; call ``enqueue``/``enqueue_each``/``deferred_result`` in your
    methods.  Class attributes are the defaults of the options of the same name."""

    record_return_values: bool = False
    push_progress_updates: bool = False
    time_to_run: float = 120.0
    max_retries: int = 3
    retry_delay: float = 1.0  # s before the first retry; doubles each time
    wait_timeout: float | None = None  # s a blocking deferred_result waits (None: no limit)
    max_crashes: int = 3  # deaths of its worker process a job may cause before it fails for good

    def __init__(self, name: str | None = None, push_progress_updates: bool = False, *,
                 record_return_values: bool | None = None, time_to_run: float | None = None,
                 max_retries: int | None = None, retry_delay: float | None = None,
                 backend: Backend | str | None = None) -> None:
        self.name = check_name(name) if name is not None else f"run-{uuid.uuid4().hex[:16]}"
        self.push_progress_updates = bool(push_progress_updates)
        if record_return_values is not None:
            self.record_return_values = bool(record_return_values)
        if time_to_run is not None:
            self.time_to_run = time_to_run
        if max_retries is not None:
            self.max_retries = max_retries
        if retry_delay is not None:
            self.retry_delay = retry_delay
        self._options()  # refuse bad values now, not at the first enqueue
        if backend is not None and not isinstance(backend, (Backend, str)):
            raise TypeError(f"backend= takes a Backend or a backend name, not {type(backend).__name__}")
        self._pm_init(backend)

    def _pm_init(self, backend: Backend | str | None = None) -> None:
        self._pm_backend_spec = backend
        self._pm_backend: Backend | None = backend if isinstance(backend, Backend) else None
        self._pm_gen: str | None = None  # the generation this instance is adding to
        self._pm_progress: Progress | None = None  # the last progress read
        self._pm_pusher: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_pm_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pm_init()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # --- plumbing ------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        if self._pm_backend is None:
            self._pm_backend = _config.get_backend(self._pm_backend_spec)
        return self._pm_backend

    def _state(self) -> RunState:
        return RunState(self.backend, signer_for(self.backend), self.name, _config.state_ttl())

    def _options(self) -> tuple[float, int, float, bool]:
        ttr, retries, delay = self.time_to_run, self.max_retries, self.retry_delay
        if isinstance(ttr, bool) or not isinstance(ttr, (int, float)) or not ttr > 0:
            raise ValueError(f"time_to_run must be a positive number of seconds, not {ttr!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, not {retries!r}")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError(f"retry_delay must be a number of seconds >= 0, not {delay!r}")
        return float(ttr), retries, float(delay), bool(self.record_return_values)

    def _check_method(self, method_name: str) -> None:
        """Refuse, with nothing queued, a name that is no job method (``packmule._model.methods``)."""
        why = refusal(type(self), method_name)
        if why is not None:
            raise (ValueError if isinstance(method_name, str) else TypeError)(why)

    def _serialize(self, what: str, obj: Any) -> bytes:
        try:
            return dumps(obj)
        except Exception as exc:
            raise TypeError(f"{type(self).__name__}: cannot serialize {what} ({type(exc).__name__}: {exc}); "
                            "jobs, arguments and return values must be picklable by cloudpickle") from exc

    def _runner_blob(self) -> tuple[str, bytes]:
        try:
            payload = cloudpickle.dumps(self, 5)
        except Exception as exc:
            raise TypeError(f"cannot serialize the runner {self!r} ({type(exc).__name__}: {exc}); "
                            "every attribute of a runner must be picklable by cloudpickle") from exc
        digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
        return digest, signer_for(self.backend).sign(payload)

    def _job_context(self) -> JobContext | None:
        """The running job, if this call is made inside a job of this same run."""
        ctx = current.get()
        if ctx is not None and ctx.task.name == self.name and ctx.backend is self.backend:
            return ctx
        return None

    # --- enqueue ---------------------------------------------------------------------
    def enqueue(self, method_name: str, *args: Any, **kwargs: Any) -> JobRef:
        """Queue ``self.method_name(*args, **kwargs)`` as a job; returns its JobRef."""
        return self._enqueue(method_name, [[(args, kwargs, ())]])[0]

    def enqueue_each(self, method_name: str, items: Iterable[Any], *args: Any, **kwargs: Any) -> list[JobRef]:
        """``enqueue(method_name, item, *args, **kwargs)`` for each item, in bulk."""
        items = list(items)
        # in the form a bundle carries enqueue_each's jobs: nothing built per item
        return self._enqueue(method_name, [(items[i:i + BUNDLE], args, kwargs) for i in range(0, len(items), BUNDLE)])

    def _enqueue(self, method: str, chunks: list[Entries]) -> list[JobRef]:
        """Queue the jobs of ``chunks``: the entries of one bundle each, at most
        BUNDLE jobs (``packmule._transport.wire``)."""
        self._check_method(method)
        ttr, retries, delay, record = self._options()
        entries = [self._entries(method, chunk) for chunk in chunks]  # refuses a bad item before queueing
        digest, runner_blob = self._runner_blob()
        self._check_sizes(method, chunks, entries, runner_blob)
        backend = self.backend
        ctx = self._job_context()
        if ctx is not None:  # inside a job of this run: committed when the job returns
            gen = ctx.task.gen
            ctx.blobs[digest] = runner_blob
            refs: list[JobRef] = []
            for args, kwargs, _ in (job for chunk in chunks for job in expand(chunk)):
                path = ctx.next_path()
                ctx.child_index[path] = len(ctx.children)
                ctx.children.append(Task(self.name, gen, path, method, args, kwargs, digest, ttr, retries, delay,
                                         record, ()))
                refs.append(ref_for(backend, self.name, gen, path))
            return refs
        sizes = [count(chunk) for chunk in chunks]
        jobs = sum(sizes)
        if not jobs:
            return []
        backend.ensure_workers()
        _dashboard.serve_from_driver(backend)  # PACKMULE_DASHBOARD_PORT
        state = self._state()
        gen = self._pm_gen or state.start_or_join()
        p = prefix(self.name, gen)
        if (id(backend.store), digest) not in _stored_blobs:
            backend.store.add_many(spill_values(backend.store, state.signer, {blob_key(digest): runner_blob},
                                                state.ttl), state.ttl)
            _stored_blobs.add((id(backend.store), digest))
        # a bundle must be one block of paths (one server): a bulk call takes a
        # range wide enough to start at a multiple of BUNDLE; the gap is unused
        span = 1 if jobs == 1 else jobs + BUNDLE - 1
        counters = backend.store.incr_many({p + "seq": span, p + "total": jobs})
        last = counters.get(p + "seq")
        if last is None or counters.get(p + "total") is None:
            self._pm_gen = None
            raise RunStateLost(f"run {self.name!r}: its state vanished from the store while jobs were "
                               "being queued (store restarted or run forgotten); nothing was queued")
        self._pm_gen = gen
        _config.note_run(self.name, gen)  # (packmule.testing's join watches the runs a test queued)
        first_free = last - span
        base = -(-first_free // BUNDLE) * BUNDLE if span > 1 else first_free
        signer = signer_for(backend)
        by_server: dict[str, tuple[list[Put], list[str]]] = {}  # server -> (its puts, the paths they carry)
        for i, (chunk, blob, size) in enumerate(zip(chunks, entries, sizes, strict=True)):
            start = base + i * BUNDLE
            first = Task(self.name, gen, str(start), method, (), {}, digest, ttr, retries, delay, record, ())
            puts, paths = by_server.setdefault(backend.queue.server_for(shard(self.name, gen, str(start))), ([], []))
            puts += pack(signer, first, blob, size, lambda chunk=chunk: expand(chunk))  # type: ignore[misc]
            paths += map(str, range(start, start + size))
        marks = {p + "root": b"0"} if first_free == 0 else {}  # the generation's first outside enqueue: its root
        # the paths of the range left unused, before and after, so that a recount knows they held no job
        for start, end in ((first_free, base), (base + jobs, last)):
            if end > start:
                marks[p + "gap:" + str(start)] = str(end - start).encode()
        self._put(backend, state, p, marks, by_server)
        head = f"{self.name}/{gen}/"
        refs = []
        for i, size in enumerate(sizes):
            start = base + i * BUNDLE
            server = backend.queue.server_for(shard(self.name, gen, str(start)))
            refs += [JobRef.fast(head + str(start + j), server) for j in range(size)]
        return refs

    def _put(self, backend: Backend, state: RunState, p: str, marks: dict[str, bytes],
             by_server: dict[str, tuple[list[Put], list[str]]]) -> None:
        """Queue the puts of an outside enqueue, server by server, its jobs
        counted in ``total`` already.  If a put fails, the jobs of that server and
        of those not reached are taken back: each gets a void value (should a
        failed put have queued some, they find their value taken and count
        nothing), and the count of those whose void this call added comes off
        ``total``.  A job whose value was there first was queued after all, and
        a worker completed it: it stays counted.  Then the error is raised."""
        servers = list(by_server)
        done = 0
        try:
            if marks:
                backend.store.add_many(marks, state.ttl)
            for server in servers:
                backend.queue.put_many(spill_bodies(backend, state.signer, by_server[server][0], state.ttl))
                done += 1
        except BaseException as exc:
            lost = [path for server in servers[done:] for path in by_server[server][1]]
            try:
                void = state.signer.dumps(VOID)
                voided = backend.store.add_many({p + "v:" + path: void for path in lost}, state.ttl)
                if voided:
                    backend.store.incr_many({p + "total": -len(voided)})
            except Exception as undo:
                exc.add_note(f"packmule could not take back the count of the {len(lost)} jobs not queued "
                             f"({undo!r}): run {self.name!r} will not complete; forget() it")
                raise
            ran = len(lost) - len(voided)
            exc.add_note(f"run {self.name!r}: none of the {len(voided)} jobs of this call that were not queued "
                         "is counted" + (f"; {ran} more were queued after all, ran and count" if ran else
                                         "; the run's progress is as it was before the call"))
            raise

    def _check_sizes(self, method: str, chunks: list[Entries], entries: list[bytes], runner_blob: bytes) -> None:
        """Refuse, before anything is counted or queued, a job whose pickled
        arguments or runner is over packmule's payload limit (the same on every
        backend: what works on one works on all)."""
        limit = _config.max_payload()
        if len(runner_blob) > limit:
            raise ValueError(f"the runner {self!r} is {len(runner_blob):,} bytes pickled, over packmule's limit "
                             f"of {limit:,} bytes (PACKMULE_MAX_PAYLOAD); keep large data out of its attributes "
                             "(pass a path or a key instead), or raise the limit")
        for chunk, blob in zip(chunks, entries, strict=True):
            if len(blob) <= limit:
                continue
            for args, kwargs, _ in expand(chunk):
                size = len(dumps((args, kwargs)))
                if size > limit:
                    raise ValueError(f"the arguments of {method} are {size:,} bytes pickled, over packmule's "
                                     f"limit of {limit:,} bytes (PACKMULE_MAX_PAYLOAD); pass a path or a key to "
                                     "the data instead, or raise the limit")

    def _entries(self, method: str, chunk: Entries) -> bytes:
        try:
            return dumps(chunk)
        except Exception:
            for args, kwargs, _ in expand(chunk):
                self._serialize(f"the arguments of {method}{args!r}"[:300], (args, kwargs))
            raise

    # --- deferred_result -------------------------------------------------------------
    def deferred_result(self, method_name: str, jobs: Iterable[JobRef], *args: Any, **kwargs: Any) -> Any:
        """Call ``self.method_name(values, *args, **kwargs)`` once every job is
        done.  Outside a job: blocks and returns the method's value.  Inside a job:
        returns a JobRef to the continuation at once."""
        self._check_method(method_name)
        refs = list(jobs)
        for ref in refs:
            if not isinstance(ref, JobRef):
                raise TypeError(f"deferred_result takes a list of JobRef, got {type(ref).__name__}: {ref!r}")
        ctx = self._job_context()
        if ctx is None:
            values = self._wait_values(refs)
            self._pm_gen = None  # the next outside enqueue starts (or joins) a run afresh
            return getattr(self, method_name)(values, *args, **kwargs)
        ttr, retries, delay, record = self._options()
        self._serialize(f"the arguments of {method_name}", (args, kwargs))
        digest, runner_blob = self._runner_blob()
        ctx.blobs[digest] = runner_blob
        path = ctx.next_path()
        gen = ctx.task.gen
        own: list[str] = []
        for ref in refs:
            name, rgen, rpath = parse_job_id(ref[0])  # (a worker reads these: refuse what it could not)
            if ((name, rgen) == (self.name, gen) and rpath not in own
                    and (rpath in ctx.child_index or rpath in ctx.deferreds)):
                own.append(rpath)
        for rpath in own:
            if rpath in ctx.child_index:
                i = ctx.child_index[rpath]
                child = ctx.children[i]
                ctx.children[i] = child._replace(watchers=(*child.watchers, (path, len(own))))
            else:
                ctx.deferreds[rpath].watchers.append((path, len(own)))
        ctx.deferreds[path] = Spec(method_name, [r.id for r in refs], (args, kwargs), digest, ttr, retries, delay,
                                   record, len(own))
        return ref_for(self.backend, self.name, gen, path)

    def _wait_values(self, refs: Sequence[JobRef]) -> list[Any]:
        """Block until every ref has a value; the values in order, or the first
        failure.  An unreachable store is ridden out as ``wait()`` does."""
        state = self._state()
        ids = [r[0] for r in refs]  # (r.id, without a property call per ref)
        gen = self._pm_gen
        head = f"{self.name}/{gen}/"
        if gen is not None and all(i.startswith(head) for i in ids):
            key_head, cut = prefix(self.name, gen) + "v:", len(head)  # value_key, the run's part once
            ref_keys = [key_head + i[cut:] for i in ids]
        else:
            gen = None  # inputs from another run: no counter to gate on
            ref_keys = value_keys(ids)
        waiter = _Waiter(self, f"{len(ref_keys)} jobs for deferred_result", self.wait_timeout)
        reader = _ValueReader(state, list(dict.fromkeys(ref_keys)), gen, waiter)  # each value read once
        while not reader.finished():
            try:
                reader.step()
            except BackendUnavailable as exc:
                reader.ahead = None  # read again from the first value missing
                waiter.unreachable(exc)
        recs, follow = reader.recs, reader.refs_to_follow
        signer, store = state.signer, state.store
        trail: list[str] = list(follow.values())
        while follow:  # values that are JobRefs: follow them to the end
            try:
                ends = records(store, signer, list(set(follow.values())), trail)
            except BackendUnavailable as exc:
                waiter.unreachable(exc)
                continue
            missing = {k: r for k, r in follow.items() if r not in ends}
            recs.update((k, ends[r]) for k, r in follow.items() if r in ends)
            follow = missing
            if missing:
                waiter.pause(f"{len(missing)} followed JobRefs not done")
        if gen is not None:
            self._wait_counted(state, gen, len(reader.keys), waiter, reader.counts)
        values = []
        for ref_id, key in zip(ids, ref_keys, strict=True):
            rec = recs[key]
            # the common case inline; unwrap raises for a failure (the first, in order)
            values.append(rec[1] if rec[0] == "ok" else unwrap(rec, ref_id))
        if not self.record_return_values:
            store.set_many(dict.fromkeys([*reader.keys, *value_keys(trail)], signer.dumps(GONE)), state.ttl)
        return values

    @staticmethod
    def _wait_counted(state: RunState, gen: str, jobs: int, waiter: _Waiter, first: Progress | None) -> None:
        """A job's value is stored a moment before its worker counts it done (the
        add decides which execution completes it, then the count follows).  With
        every value in hand, wait for the counts too, so that the progress read
        after a blocking deferred_result includes its jobs: ``done`` reaches
        their number, or the run is complete.  (A worker that died in between
        is a stall that the waiter recounts.)  ``first``: the counts read with the
        last values, if any; usually they already say so."""
        if first is not None and (first.done >= jobs or first.complete):
            return
        looks = 0
        while True:
            try:
                now = state.progress(gen, missing_ok=True)
            except BackendUnavailable as exc:
                waiter.unreachable(exc)
                continue
            if now is None or now.done >= jobs or now.complete:  # (counters gone: nothing to wait for)
                return
            looks += 1
            if looks > 2:  # (the count is usually one store call behind its value: look again at once, twice)
                waiter.pause(f"{jobs} values in hand, {now.done} jobs counted done so far")

    # --- reading a run ------------------------------------------------------------------
    def _gen(self) -> str | None:
        return self._pm_gen or self._state().current_gen()

    def update_progress(self) -> Progress:
        """Read the run's progress from the backend: ``'<done>.0 / <total>.0'``."""
        gen = self._gen()
        progress = Progress(0, 0) if gen is None else self._state().progress(gen)
        assert progress is not None
        self._pm_progress = progress
        return progress

    @property
    def current_progress(self) -> Progress:
        """With push_progress_updates: kept fresh in the background; otherwise the
        value last read by update_progress()."""
        # (threads do not survive a fork: a child's first read starts its own)
        if self.push_progress_updates and (self._pm_pusher is None or not self._pm_pusher.is_alive()):
            self._pm_pusher = threading.Thread(target=_push, args=(weakref.ref(self),), daemon=True,
                                               name=f"packmule-progress-{self.name}")
            self._pm_pusher.start()
            self.update_progress()
        return self._pm_progress or Progress(0, 0)

    def get_return_value(self, ref: JobRef | None = None) -> Any:
        """The value of the run's root job (or of ``ref``), JobRefs followed."""
        if not self.record_return_values:
            raise ValuesNotRecorded(f"{type(self).__name__} {self.name!r} does not record return values; "
                                    "pass record_return_values=True (or set it on the class) to read them")
        state = self._state()
        if ref is None:
            gen = self._gen()
            if gen is None:
                raise NotReady(f"run {self.name!r} has no jobs")
            progress = state.progress(gen)
            assert progress is not None
            if not progress.complete:
                if state.cancelled(gen):
                    raise Cancelled(f"run {self.name!r} was cancelled at {progress}")
                raise NotReady(f"run {self.name!r} is not complete: {progress}")
            root = state.root_path(gen)
            if root is None:
                raise RunStateLost(f"run {self.name!r}: its root job is gone from the store")
            ref = ref_for(self.backend, self.name, gen, root)
        elif not isinstance(ref, JobRef):
            raise TypeError(f"get_return_value takes a JobRef, not {type(ref).__name__}")
        rec = state.records([ref.id]).get(ref.id)
        if rec is None:
            raise NotReady(f"job {ref.id} has no value yet")
        return unwrap(rec, ref.id)

    def wait(self, timeout: float | None = None, progress: bool = False) -> Progress:
        """Block until the run is complete; returns its final Progress."""
        waiter = _Waiter(self, "the run to complete", timeout)
        bar = None
        try:
            while True:
                try:
                    now = self.update_progress()
                except BackendUnavailable as exc:
                    waiter.unreachable(exc)
                    continue
                if progress and (bar is None or (bar.n, bar.total) != (now.done, now.total)):
                    bar = bar or _bar(self.name)
                    bar.total, bar.n = now.total, now.done
                    bar.refresh()
                if now.complete:
                    return now
                if now.total == 0:
                    raise NotReady(f"run {self.name!r} has no jobs to wait for")
                waiter.pause(f"{now}")
        finally:
            if bar is not None:
                bar.close()

    # --- coordination ---------------------------------------------------------------------
    def lock(self, name: str, timeout: float | None = None) -> AbstractContextManager[None]:
        """A mutex shared by every worker of the backend."""
        lock: AbstractContextManager[None] = self.backend.lock(user_lock(name), timeout)
        return lock

    def touch(self) -> None:
        """Inside a job: restart its time_to_run.  Outside a job: nothing to do."""
        ctx = current.get()
        if ctx is not None:
            ctx.backend.queue.touch(ctx.handle)
            if Watchdog.current is not None:
                Watchdog.current.touch(ctx.handle)

    def cancel(self) -> None:
        """Drop the run's jobs not yet started; waiting on the run raises Cancelled."""
        gen = self._gen()
        if gen is not None:
            self.backend.store.set_many({prefix(self.name, gen) + "cancel": b"1"}, _config.state_ttl())

    def forget(self) -> None:
        """Remove the run's state (its current generation: every key that can be
        named from its counters and markers) so the name starts afresh.  Jobs of
        it still queued are set aside by the workers (their run has no state)."""
        gen = self._gen()
        store = self.backend.store
        keys = [pointer(self.name)]
        if gen is not None:
            keys += _census.run_keys(store, self.name, gen, prefix(self.name, gen))
            keys += _registry.slot_of(store, self.name, gen, prefix(self.name, gen))  # (off the dashboard too)
        _census.delete(store, keys)
        self._pm_gen = None
        self._pm_progress = None

    def _recount(self, gen: str, quiet: bool = False) -> str | None:
        """Recount a stalled run from its value records (``packmule._model.census``),
        one process at a time; what was fixed, or None.  ``quiet``: nothing is
        queued or running anywhere."""
        state = self._state()
        with _census.lock_run(self.backend, self.name):
            return _census.recount(self.backend, state.signer, self.name, gen, prefix(self.name, gen), state.ttl,
                                   quiet)


FRAMEWORK.add(Runner)


class _ValueReader:
    """How a blocking deferred_result reads its values.  They are read a window of
    READ_CHUNK keys at a time, from the first one missing on.  While windows come
    back full, the reader is behind the workers: it asks for the next window
    before it checks the values of this one, so that the store fetches while it
    checks.  With a counter to gate on (inputs of this run), values are read only
    when enough jobs finished since the last look: three counters are cheaper
    than a thousand values."""

    def __init__(self, state: RunState, keys: list[str], gen: str | None, waiter: _Waiter) -> None:
        self.state, self.keys, self.gen, self.waiter = state, keys, gen, waiter
        self.recs: dict[str, tuple[Any, ...]] = {}
        self.refs_to_follow: dict[str, str] = {}  # value key -> the job id its value refers to
        self.pos = self.cursor = 0  # keys[:pos] are read; this sweep asked for keys[pos:cursor]
        self.seen_done = self.last_done = -1
        self.ahead: tuple[list[str], Callable[[], dict[str, bytes]]] | None = None  # a window asked for
        # the run's counters, read with the last window of values (after them): no extra trip to check them
        self.counters = [] if gen is None else state.counter_keys(gen)
        self.counts: Progress | None = None

    def finished(self) -> bool:
        return self.pos >= len(self.keys)

    def step(self) -> None:
        keys, waiter, state = self.keys, self.waiter, self.state
        left = len(keys) - self.pos
        if self.ahead is None:
            if self.gen is not None and left > 100:
                now = state.progress(self.gen)
                assert now is not None
                if now.done != self.last_done:
                    # jobs are finishing: keep looking often, so that the values are
                    # read while workers run and the last ones soon after they exist
                    self.last_done = now.done
                    waiter.progressed()
                if now.done - self.seen_done < min(left, READ_CHUNK) and not now.complete:
                    waiter.pause(f"{left} of {len(keys)} jobs not done")
                    return
                self.seen_done = now.done
            self.cursor = self.pos
            self._ask()
        assert self.ahead is not None
        window, answer = self.ahead
        raw = answer()
        if self.counters and self.counters[0] in raw:  # (asked for with the last window)
            self.counts = progress_of(self.counters, raw)
            for k in self.counters:
                raw.pop(k, None)
        got = gather(state.store, state.signer, raw)
        self.ahead = None
        if len(got) == len(window) and self.cursor < len(keys):
            self._ask()  # every value asked for was there: more may be, ask for them now
        for key, rec in zip(got, state.signer.loads_many(got.values()), strict=True):
            self.recs[key] = rec
            if rec[0] == "ref":
                self.refs_to_follow[key] = rec[1]
        while self.pos < len(keys) and keys[self.pos] in self.recs:
            self.pos += 1
        if self.ahead is None and self.pos < len(keys):
            waiter.pause(f"{len(keys) - self.pos} of {len(keys)} jobs not done")
        else:
            waiter.progressed()

    def _ask(self) -> None:
        """Start reading the values of the next window not read yet."""
        window = [k for k in self.keys[self.cursor:self.cursor + READ_CHUNK] if k not in self.recs]
        last = self.cursor + READ_CHUNK >= len(self.keys)
        self.ahead = window, self.state.store.get_many_soon(window + self.counters if last else window)
        self.cursor += READ_CHUNK


class _Waiter:
    """The pacing of a blocking wait: backoff, timeout, cancel/lost checks, no-worker
    detection, and a log line now and then saying what it waits for."""

    def __init__(self, runner: Runner, what: str, timeout: float | None) -> None:
        self.runner, self.what, self.timeout = runner, what, timeout
        self.start = self.last_check = self.last_said = time.monotonic()
        self.started_at = time.time()  # (wall clock: workers on other machines stamp their notes with it)
        self.delay = POLL_MIN
        self.poll_max = max(POLL_MIN, POLL_MAX * _config.delay_scale())  # (PACKMULE_DELAY_SCALE)
        self.idle_since: float | None = None
        self.empty_since: float | None = None
        self.outage_since: float | None = None
        self.done_seen, self.moved_at = -1, self.start  # the run's done count, and when it last changed
        self.recount_after = STALLED_AFTER  # s without progress before a recount (doubles while it finds nothing)

    def progressed(self) -> None:
        self.delay = POLL_MIN
        self.outage_since = None

    def unreachable(self, exc: BackendUnavailable) -> None:
        """A server did not answer: wait for it (workers reconnect too), saying
        so, up to OUTAGE_GRACE seconds; then give up with its error."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
            log.warning("run %r: %s; waiting up to %.0fs for it to come back", self.runner.name, exc, OUTAGE_GRACE)
        elif now - self.outage_since > OUTAGE_GRACE:
            raise exc
        time.sleep(0.5)

    def pause(self, status: str) -> None:
        now = time.monotonic()
        name = self.runner.name
        if self.timeout is not None and now - self.start >= self.timeout:
            raise TimeoutError(f"run {name!r}: waited {self.timeout:g}s for {self.what}; {status}")
        if now - self.last_check >= 0.5:
            self.last_check = now
            try:
                self._check(now, status)
                self.outage_since = None
            except BackendUnavailable as exc:
                self.unreachable(exc)
        if now - self.last_said >= STILL_WAITING_EVERY:
            self.last_said = now
            log.info("run %r: still waiting for %s (%s)", name, self.what, status)
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.poll_max)

    def _recount(self, gen: str, quiet: bool) -> bool:
        """Recount the run (``Runner._recount``); whether it fixed anything.  The
        next recount without progress waits twice as long."""
        try:
            fixed = self.runner._recount(gen, quiet) is not None
        except (TimeoutError, BackendUnavailable) as exc:  # the lock: another process recounts, or is gone
            log.warning("run %r: no recount now: %s", self.runner.name, exc)
            fixed = False
        now = time.monotonic()
        if fixed:
            self.empty_since, self.moved_at, self.recount_after = None, now, STALLED_AFTER
        else:
            self.moved_at, self.recount_after = now, min(self.recount_after * 2, RECOUNT_AFTER_MAX)
        return fixed

    def _check(self, now: float, status: str) -> None:
        runner = self.runner
        gen = runner._gen()
        progress = None
        if gen is not None:
            state = runner._state()
            progress = state.progress(gen)  # raises RunStateLost
            assert progress is not None
            if progress.done != self.done_seen:
                self.done_seen, self.moved_at, self.recount_after = progress.done, now, STALLED_AFTER
            cancelled, rejected = state.alerts(gen)
            if cancelled:
                raise Cancelled(f"run {runner.name!r} was cancelled ({status})")
            if rejected is not None and rejected[0] >= self.started_at - REJECTED_BEFORE:
                raise SecretMismatch(
                    f"run {runner.name!r} ({status}): workers refused jobs signed by this process "
                    f"{time.time() - rejected[0]:.0f}s ago because their signature does not match: the workers "
                    f"have another PACKMULE_SECRET (key id {rejected[1]}; this process's is "
                    f"{state.signer.key_id.hex()}). Every process, drivers and `packmule worker`s, must share "
                    "the same PACKMULE_SECRET; the refused jobs are buried. Fix the secret, then forget() the "
                    "run and queue it again")
        stats = runner.backend.queue.stats()
        if gen is not None and not (stats.ready or stats.reserved or stats.delayed):
            self.empty_since = self.empty_since or now
        else:
            self.empty_since = None
        quiet = self.empty_since is not None and now - self.empty_since >= STALLED_AFTER
        if gen is not None and progress is not None and progress.done < progress.total and (
                quiet or now - self.moved_at >= self.recount_after):
            # no progress for a while (or nothing at all queued or running): a
            # worker may have died between two store writes; recount the run
            if self._recount(gen, quiet):
                return
            if quiet:  # nothing anywhere in the queue, nothing to recount: it will never complete
                raise RunStateLost(f"run {runner.name!r} is stalled: nothing is queued or running, yet it is "
                                   f"at {status}, and its value records say the same; its state was evicted "
                                   "or its jobs were lost (see `packmule status`)")
        if stats.workers > 0 or not (stats.ready or stats.delayed):
            self.idle_since = None
            return
        self.idle_since = self.idle_since or now
        idle = now - self.idle_since
        hint = getattr(runner.backend, "worker_hint", "start workers for this backend")
        if idle >= NO_WORKERS_RAISE:
            raise NoWorkers(f"run {runner.name!r}: no worker has served the queue for {idle:.0f}s while "
                            f"{stats.ready} jobs wait ({status}); {hint}")
        if idle >= NO_WORKERS_WARN and idle - 0.5 < NO_WORKERS_WARN:
            log.warning("run %r: no worker serves the queue (%d jobs wait); %s", runner.name, stats.ready, hint)


def _bar(name: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=0, desc=name, unit="job")


def _push(ref: weakref.ReferenceType[Runner]) -> None:
    while True:
        runner = ref()
        if runner is None:
            return
        try:
            runner.update_progress()
        except Exception as exc:  # keep the last value; the next read will say what is wrong
            log.debug("progress refresh for %r failed: %r", runner.name, exc)
        del runner
        time.sleep(PUSH_EVERY)
