"""A ``django.tasks`` backend that runs tasks on packmule's workers::

    TASKS = {"default": {"BACKEND": "packmule.contrib.django.tasks.PackmuleBackend"}}

Each ``Task.enqueue()`` is one packmule job in a run of its own, named after
the result id (``django-task-<id>``), queued with the task's ``priority`` as
packmule's ``priority=`` and its ``run_after`` as ``at=``.  The job
(``_TaskJobs.run_task``) runs in a packmule worker: it sets Django up there
once per process (``DJANGO_SETTINGS_MODULE``), finds the task by its module
and name, and calls it.

The result's state is a record in packmule's store under ``pm-djtask:{<id>}``
(its own tag: every process finds it, whichever run it belongs to): the task's
place and options, status, times, worker ids, errors, arguments and return
value, as JSON signed with ``PACKMULE_SECRET`` (chunked like any large value),
kept as long as a run's state (``PACKMULE_STATE_TTL``).  The enqueuing process
writes it before it queues the job; the job's worker rewrites it as the
attempt starts and ends; ``get_result`` in any process reads it.

``OPTIONS`` (all optional): ``backend`` (a packmule backend name; default
``PACKMULE_BACKEND``), and the packmule job options ``time_to_run`` (seconds;
120), ``max_retries`` (0: a task that raises is FAILED, as Django's own
backends do) and ``retry_delay`` (seconds, doubling; 1).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

import packmule
from packmule._core import config as _config
from packmule._core.errors import JobFailed, PackMuleError
from packmule._core.tracebacks import describe
from packmule._model.job import current
from packmule._model.keys import prefix
from packmule._transport.codec import signer_for
from packmule._transport.spill import gather, spill_values
from packmule.backends import _choice
from packmule.backends.base import Backend
from packmule.contrib.django._tasks_compat import API

__all__ = ["RECORD_PREFIX", "RUN_PREFIX", "PackmuleBackend", "record_key"]

log = logging.getLogger("packmule")

RECORD_PREFIX = "pm-djtask:"  # + "{<result id>}": a task result's record (its id is its store tag)
RUN_PREFIX = "django-task-"  # + the result id: the packmule run of a task
ID_RE = re.compile(r"[0-9a-f]{32}\Z")  # a result id, as enqueue makes them (uuid4().hex)
OPTIONS = {"backend", "time_to_run", "max_retries", "retry_delay"}  # what a TASKS alias's OPTIONS may set

_READY, _RUNNING, _FAILED, _SUCCESSFUL = "READY", "RUNNING", "FAILED", "SUCCESSFUL"
_setup_lock = threading.Lock()


def record_key(result_id: str) -> str:
    return f"{RECORD_PREFIX}{{{result_id}}}"


class _TaskJobs(packmule.Runner):
    """The packmule side of a task: one run per task result, of one job."""

    record_return_values = True  # (the job returns None; its value record tells get_result it ended)
    max_retries = 0

    def run_task(self, result_id: str, alias: str) -> None:
        """The job: run the task of ``result_id`` with the ``TASKS`` alias that queued it."""
        _setup_django()
        backend = API.task_backends[alias]
        if not isinstance(backend, PackmuleBackend):
            raise ImproperlyConfigured(f"TASKS[{alias!r}] is {type(backend).__name__} in this worker, not "
                                       "PackmuleBackend: give the workers the settings of the process that enqueued")
        backend._run(result_id, self)


def _setup_django() -> None:
    """``django.setup()`` once in this process, unless the program did it already."""
    from django.apps import apps

    if apps.ready:
        return
    with _setup_lock:
        if not apps.ready:
            if not os.environ.get("DJANGO_SETTINGS_MODULE"):
                from django.conf import settings

                if not settings.configured:
                    raise ImproperlyConfigured(
                        "a packmule worker runs Django tasks with the project's settings: set "
                        "DJANGO_SETTINGS_MODULE in the environment of `packmule worker` (or of the program "
                        "that starts the local backend's workers)")
            import django

            django.setup()


_BaseTaskBackend: Any = API.BaseTaskBackend  # (from django.tasks or the backport: _tasks_compat)


class PackmuleBackend(_BaseTaskBackend):
    """Runs ``django.tasks`` tasks as packmule jobs (module docstring)."""

    supports_defer = True  # run_after: packmule's at=
    supports_async_task = True  # async def tasks run in the worker (Task.call: async_to_sync)
    supports_get_result = True  # from any process: the record in packmule's store
    supports_priority = True  # -100..100, higher first: packmule's priority=

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = dict(params.get("OPTIONS") or {})
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ImproperlyConfigured(f"TASKS[{alias!r}]['OPTIONS']: unknown {', '.join(unknown)} (PackmuleBackend "
                                       f"takes {', '.join(sorted(OPTIONS))})")
        spec = options.pop("backend", None)
        if spec is not None and not isinstance(spec, str):
            raise ImproperlyConfigured(f"TASKS[{alias!r}]['OPTIONS']['backend'] takes a packmule backend name, "
                                       f"not {type(spec).__name__}")
        self._spec: str | None = spec
        self._job_options: dict[str, Any] = options
        try:
            _TaskJobs("options-check", **options)  # refuses bad values now (it connects to nothing)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"TASKS[{alias!r}]['OPTIONS']: {exc}") from exc

    # --- enqueue -------------------------------------------------------------------------
    def validate_task(self, task: Any) -> None:
        """Django's checks (module level, context argument, priority range, an
        aware ``run_after``, a configured queue), and what packmule's
        ``priority=`` and ``at=`` take besides: an int priority, a datetime
        with a time zone.  ``InvalidTask`` otherwise."""
        run_after = task.run_after  # (first: Django's check takes any run_after for a datetime)
        if run_after is not None and (not isinstance(run_after, datetime) or run_after.utcoffset() is None):
            raise API.InvalidTask(f"run_after must be an aware datetime (with a time zone), not {run_after!r}")
        super().validate_task(task)
        if isinstance(task.priority, bool) or not isinstance(task.priority, int):
            raise API.InvalidTask(f"priority must be an int from -100 to 100, not {task.priority!r}")
        if task.func.__module__ == "__main__":
            raise API.InvalidTask(f"task {task.name!r} is defined in __main__: packmule's workers import a task "
                                  "by its module, so define it in a module they can import")

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Queue ``task(*args, **kwargs)`` as a packmule job; its ``TaskResult``
        (READY).  Refused with nothing queued: an invalid task (``InvalidTask``),
        arguments that do not survive a JSON round trip (``TypeError``,
        ``ValueError``)."""
        self.validate_task(task)
        _check_findable(task)
        args = _json_safe(list(args), "the arguments")
        kwargs = _json_safe(dict(kwargs), "the keyword arguments")
        result_id = uuid.uuid4().hex
        record = {
            "module": task.func.__module__, "qualname": task.func.__qualname__, "alias": self.alias,
            "priority": task.priority, "queue_name": task.queue_name,
            "run_after": task.run_after.isoformat() if task.run_after is not None else None,
            "status": _READY, "enqueued_at": timezone.now().isoformat(), "started_at": None,
            "last_attempted_at": None, "finished_at": None, "args": args, "kwargs": kwargs, "errors": [],
            "worker_ids": [], "return_value": None,
        }
        jobs = self._jobs(result_id)
        records = _Records(jobs.backend)
        records.write(result_id, record, new=True)
        try:
            jobs.enqueue_call("run_task", (result_id, self.alias), priority=task.priority, at=task.run_after)
        except (TypeError, ValueError) as exc:  # (packmule refused the timing: nothing was queued)
            records.delete(result_id)
            raise API.InvalidTask(f"{task.module_path}: {exc}") from exc
        except BaseException:
            records.delete(result_id)
            raise
        result = self._result(task, result_id, record)
        API.task_enqueued.send(type(self), task_result=result)
        return result

    def _jobs(self, result_id: str) -> _TaskJobs:
        return _TaskJobs(RUN_PREFIX + result_id, backend=self._spec, **self._job_options)

    # --- results ---------------------------------------------------------------------------
    def get_result(self, result_id: str) -> Any:
        """The ``TaskResult`` of ``result_id`` as its record says now, from any
        process; ``TaskResultDoesNotExist`` if there is none (never made, or
        expired with ``PACKMULE_STATE_TTL``)."""
        if not isinstance(result_id, str) or not ID_RE.match(result_id):
            raise API.TaskResultDoesNotExist(result_id)
        records = _Records(_choice.get_backend(self._spec))
        record = records.read(result_id)
        if record is None:
            raise API.TaskResultDoesNotExist(result_id)
        if record["status"] in (_READY, _RUNNING):
            failure = self._job_failure(result_id)
            if failure is not None:  # (the worker writes a task's last record before packmule counts its job)
                record = records.read(result_id) or record
                if record["status"] in (_READY, _RUNNING):
                    record["status"] = _FAILED
                    record["errors"].append({"exception_class_path": _class_path(type(failure)),
                                             "traceback": str(failure)})
        return self._result(_task_of(record), result_id, record)

    def _job_failure(self, result_id: str) -> JobFailed | None:
        """How packmule failed the task's job for good, if it did.  One it failed
        outside the task's code (its worker died ``max_crashes`` times while
        running it) leaves the record READY or RUNNING for ever: such a task
        reads as FAILED, with packmule's account of it as its last error."""
        try:
            self._jobs(result_id).get_return_value()
        except JobFailed as exc:
            return exc
        except PackMuleError:  # (not complete, or its run is gone: the record says all there is)
            pass
        return None

    def _result(self, task: Any, result_id: str, record: Mapping[str, Any]) -> Any:
        result = API.TaskResult(
            task=task, id=result_id, status=API.TaskResultStatus(record["status"]),
            enqueued_at=_time(record["enqueued_at"]), started_at=_time(record["started_at"]),
            finished_at=_time(record["finished_at"]), last_attempted_at=_time(record["last_attempted_at"]),
            args=record["args"], kwargs=record["kwargs"], backend=record["alias"],
            errors=[API.TaskError(**error) for error in record["errors"]], worker_ids=list(record["worker_ids"]))
        if record["status"] == _SUCCESSFUL:
            object.__setattr__(result, "_return_value", record["return_value"])
        return result

    # --- in the worker ---------------------------------------------------------------------
    def _run(self, result_id: str, jobs: _TaskJobs) -> None:
        """One attempt at the task of ``result_id``, in a packmule job: its record
        RUNNING (and this attempt's worker id) while it runs, SUCCESSFUL with
        its return value, or, when it raises, its error added and READY while
        packmule retries it (``max_retries``), FAILED at the last attempt; the
        exception is raised again for packmule to count.  ``task_started`` as
        it starts, ``task_finished`` once it is SUCCESSFUL or FAILED (inside
        the ``except`` when it raised)."""
        records = _Records(jobs.backend)
        record = records.read(result_id)
        if record is None:
            raise LookupError(f"the record of Django task result {result_id} is gone from packmule's store "
                              "(expired with PACKMULE_STATE_TTL, or the store lost it): the task was not run")
        task = _task_of(record)
        now = timezone.now().isoformat()
        record.update(status=_RUNNING, started_at=record["started_at"] or now, last_attempted_at=now)
        record["worker_ids"].append(_worker_id())
        records.write(result_id, record)
        result = self._result(task, result_id, record)
        _send(API.task_started, type(self), result)
        try:
            if task.takes_context:
                value = task.call(API.TaskContext(task_result=result), *result.args, **result.kwargs)
            else:
                value = task.call(*result.args, **result.kwargs)
            record.update(status=_SUCCESSFUL, finished_at=timezone.now().isoformat(),
                          return_value=_json_safe(value, "the return value"))
            blob = records.encode(record)  # (a return value too large to keep fails the task)
        except BaseException as exc:  # (as any job's: SystemExit too, and packmule retries or fails it)
            last = _failures_before() >= jobs.max_retries
            record.update(status=_FAILED if last else _READY, return_value=None,
                          finished_at=timezone.now().isoformat() if last else None)
            record["errors"].append({"exception_class_path": _class_path(type(exc)),
                                     "traceback": describe(exc).traceback})
            records.write(result_id, record)
            if last:
                _send(API.task_finished, type(self), self._result(task, result_id, record))
            raise
        records.write_encoded(result_id, blob)
        _send(API.task_finished, type(self), self._result(task, result_id, record))


class _Records:
    """Task result records in a packmule backend's store: signed JSON, in chunks when large."""

    def __init__(self, backend: Backend) -> None:
        self.store, self.signer, self.ttl = backend.store, signer_for(backend), _config.state_ttl()

    def encode(self, record: Mapping[str, Any]) -> bytes:
        data = json.dumps(record, allow_nan=False, separators=(",", ":")).encode()
        limit = _config.max_payload()
        if len(data) > limit:
            raise ValueError(f"the task result's record would be {len(data):,} bytes of JSON, over packmule's "
                             f"limit of {limit:,} (PACKMULE_MAX_PAYLOAD); pass or return smaller values, e.g. "
                             "the key of data kept elsewhere")
        return data

    def write(self, result_id: str, record: Mapping[str, Any], new: bool = False) -> None:
        self.write_encoded(result_id, self.encode(record), new)

    def write_encoded(self, result_id: str, data: bytes, new: bool = False) -> None:
        key = record_key(result_id)
        items = spill_values(self.store, self.signer, {key: self.signer.sign(data)}, self.ttl)
        if new and not self.store.add_many(items, self.ttl):
            raise RuntimeError(f"task result id {result_id} is taken")  # (a uuid4 collision)
        if not new:
            self.store.set_many({k: v for k, v in items.items() if isinstance(v, bytes)}, self.ttl)

    def read(self, result_id: str) -> dict[str, Any] | None:
        key = record_key(result_id)
        got = self.store.get_many([key])
        if key not in got:
            return None
        record: dict[str, Any] = json.loads(self.signer.payload(gather(self.store, self.signer, got)[key]))
        return record

    def delete(self, result_id: str) -> None:
        try:
            self.store.delete_many([record_key(result_id)])
        except Exception as exc:  # (the error that made us delete it is the one to raise)
            log.warning("the record of task result %s stays until it expires: %s", result_id, exc)


def _json_safe(value: Any, what: str) -> Any:
    """``value`` as Django normalizes it (tuples to lists, bytes to str), if it
    comes back equal from a JSON round trip: ``TypeError`` for a type JSON
    cannot hold, ``ValueError`` for a value that would come back otherwise
    (non-str dict keys, NaN, infinities)."""
    normal = API.normalize_json(value)
    try:
        back = json.loads(json.dumps(normal, allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"{what} cannot be stored as JSON: {exc}") from None
    if back != normal:
        raise ValueError(f"{what} do not survive a JSON round trip (they would come back as {back!r}, not "
                         f"{normal!r}): use str dict keys")
    return back


def _find(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _check_findable(task: Any) -> None:
    """Refuse a task that a worker could not find by its module and name (defined
    under another name, or replaced there): ``InvalidTask``."""
    try:
        found = _find(task.func.__module__, task.func.__qualname__)
    except (ImportError, AttributeError):
        found = None
    if not isinstance(found, API.Task) or found.func is not task.func:
        raise API.InvalidTask(f"{task.module_path} is not this task in its module: packmule's workers find a task "
                              "by its module and name, so define it at the top level of a module under its "
                              "function's own name")


def _task_of(record: Mapping[str, Any]) -> Any:
    """The ``Task`` a record was enqueued with: the module's, with its options."""
    found = _find(record["module"], record["qualname"])
    if not isinstance(found, API.Task):
        raise LookupError(f"{record['module']}.{record['qualname']} is no longer a Django task")
    return dataclasses.replace(found, priority=record["priority"], queue_name=record["queue_name"],
                               run_after=_time(record["run_after"]), backend=record["alias"])


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[-64:]


def _failures_before() -> int:
    """How many attempts of the running job raised before this one, as packmule
    counts them (``pm/<run>/{<gen>}/try:<path>``, ``packmule._model.keys``):
    packmule retries this one if that is below ``max_retries``."""
    ctx = current.get()
    if ctx is None:
        return 0
    t = ctx.task
    key = f"{prefix(t.name, t.gen)}try:{t.path}"
    return int(ctx.backend.store.get_many([key]).get(key) or 0)


def _send(signal: Any, sender: type, result: Any) -> None:
    """Send a signal in the worker: a receiver that raises is logged, and neither
    fails nor repeats the task."""
    for receiver, answer in signal.send_robust(sender, task_result=result):
        if isinstance(answer, Exception):
            log.error("task %s: %r raised on %s", result.id, receiver, describe(answer).message, exc_info=answer)
