"""``Runner``: the class users subclass.  Everything here is the driver's side;
the worker's side is ``packmule._worker.engine``."""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

import cloudpickle

from packmule._core import config as _config
from packmule._core.digests import blake2b
from packmule._core.errors import (
    BackendUnavailable,
    Cancelled,
    NotReady,
    RunStateLost,
    ValuesNotRecorded,
)
from packmule._core.types import JobRef, Progress
from packmule._driver.aio import Awaits
from packmule._driver.enqueue import Enqueuer
from packmule._driver.on_commit import OnCommit
from packmule._driver.run_state import RunState, ref_for
from packmule._driver.waiting import Waiter, Waits
from packmule._model import census as _census
from packmule._model import job as _job
from packmule._model import registry as _registry
from packmule._model.job import JobContext, Spec, current
from packmule._model.keys import check_name, parse_job_id, prefix, user_lock
from packmule._model.methods import FRAMEWORK, refusal
from packmule._model.records import unwrap
from packmule._model.scheduled import declare
from packmule._transport.codec import dumps, signer_for
from packmule._transport.wire import BUNDLE, Entries, Task, expand
from packmule.backends import _choice
from packmule.backends.base import Backend

__all__ = ["PUSH_EVERY", "Runner"]

log = logging.getLogger("packmule")

PUSH_EVERY = 0.25  # s: push_progress_updates refresh period


class Runner(Enqueuer, Waits, Awaits, OnCommit):
    """Subclass me; call ``enqueue``/``enqueue_each``/``deferred_result`` in your
    methods.  Class attributes are the defaults of the options of the same name."""

    record_return_values: bool = False
    push_progress_updates: bool = False
    time_to_run: float = 120.0
    max_retries: int = 3
    retry_delay: float = 1.0  # s before the first retry; doubles each time
    wait_timeout: float | None = None  # s a blocking deferred_result waits (None: no limit)
    max_crashes: int = 3  # deaths of its worker process a job may cause before it fails for good
    priority: int = 0  # of its jobs, unless enqueue says otherwise: higher runs first (-100 to 100)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declare(cls)  # (its priority and its schedules, refused now if bad: packmule._model.scheduled)

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
        self._pm_fresh_only = False  # (a schedule's tick: queue only into a generation this call makes)

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
            self._pm_backend = _choice.get_backend(self._pm_backend_spec)
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
        digest = blake2b(payload, digest_size=16).hexdigest()
        return digest, signer_for(self.backend).sign(payload)

    def _job_context(self) -> JobContext | None:
        """The running job, if this call is made inside a job of this same run."""
        ctx = current.get()
        if ctx is not None and ctx.task.name == self.name and ctx.backend is self.backend:
            return ctx
        return None

    # --- enqueue ---------------------------------------------------------------------
    def enqueue(self, method_name: str, *args: Any, delay: float | timedelta | None = None,
                at: datetime | None = None, priority: int | None = None, **kwargs: Any) -> JobRef:
        """Queue ``self.method_name(*args, **kwargs)`` as a job; returns its JobRef.
        ``delay`` (seconds or a timedelta) or ``at`` (an aware datetime): not
        before then; ``priority``: of the ready jobs, higher runs first
        (default: the class's ``priority``).  A job method with a parameter of
        one of these names gets it through ``enqueue_call``."""
        return self._enqueue(method_name, [[(args, kwargs, ())]], self._timing(delay, at, priority))[0]

    def enqueue_call(self, method_name: str, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, *,
                     delay: float | timedelta | None = None, at: datetime | None = None,
                     priority: int | None = None) -> JobRef:
        """``enqueue`` with the job's arguments given apart from the options, so
        that any keyword (``delay``, ``at``, ``priority`` too) reaches the job."""
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"enqueue_call's kwargs= takes a dict, not {type(kwargs).__name__}")
        return self._enqueue(method_name, [[(tuple(args), dict(kwargs or {}), ())]],
                             self._timing(delay, at, priority))[0]

    def enqueue_each(self, method_name: str, items: Iterable[Any], *args: Any,
                     delay: float | timedelta | None = None, at: datetime | None = None,
                     priority: int | None = None, **kwargs: Any) -> list[JobRef]:
        """``enqueue(method_name, item, *args, **kwargs)`` for each item, in bulk
        (``delay``/``at``/``priority`` as ``enqueue``'s, one for all of them)."""
        timing = self._timing(delay, at, priority)
        items = list(items)
        # in the form a bundle carries enqueue_each's jobs: nothing built per item
        return self._enqueue(method_name, [(items[i:i + BUNDLE], args, kwargs) for i in range(0, len(items), BUNDLE)],
                             timing)

    def _enqueue(self, method: str, chunks: list[Entries], timing: tuple[int, float] = (0, 0.0)) -> list[JobRef]:
        """Queue the jobs of ``chunks``: the entries of one bundle each, at most
        BUNDLE jobs (``packmule._transport.wire``), with ``timing`` (priority, due)."""
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
                                         record, (), *timing))
                refs.append(ref_for(backend, self.name, gen, path))
            return refs
        return self._queue_outside(method, chunks, entries, digest, runner_blob, (ttr, retries, delay, record),
                                   timing)

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
        waiter = Waiter(self, "the run to complete", timeout)
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
                waiter.pause(f"{now}", until_done=now.total)
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
            if _job.watchdog is not None:
                _job.watchdog.touch(ctx.handle)

    def cancel(self) -> None:
        """Drop the run's jobs not yet started; waiting on the run raises Cancelled."""
        gen = self._gen()
        if gen is not None:
            self.backend.store.set_many({prefix(self.name, gen) + "cancel": b"1"}, _config.state_ttl())
            self.backend.store.flush()  # (seen by every connection once this returns)

    def forget(self) -> None:
        """Remove the run's state (its current generation: every key that can be
        named from its counters and markers) so the name starts afresh.  Jobs of
        it still queued are set aside by the workers (their run has no state).
        If the store server that holds the generation cannot be reached, the
        name is freed all the same; the generation's keys expire with their ttl."""
        gen = self._gen()
        store = self.backend.store
        state = self._state()
        keys: list[str] = []
        if gen is not None:
            try:
                keys += _census.run_keys(store, self.name, gen, prefix(self.name, gen))
                keys += _registry.slot_of(store, self.name, gen, prefix(self.name, gen))  # (off the dashboard too)
            except BackendUnavailable as exc:
                log.warning("run %r: forgotten, but its state stays until it expires: %s", self.name, exc)
                keys = []
        state.forget_pointer()
        if keys:
            _census.delete(store, keys)
        store.flush()  # (forgotten for every connection once this returns)
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


# (their names are no job methods; RunnerMaker copies their runners)
FRAMEWORK.update((Runner, Enqueuer, Waits, Awaits, OnCommit))


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
