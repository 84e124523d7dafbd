"""``packmule.contrib.django.tasks.PackmuleBackend``: plain ``django.tasks``
tasks (tests/django_tasks_tasks.py) enqueued in this process run on packmule's
workers, on the local backend and on a real beanstalk cluster, and their
results read back from any process as Django's contract says
(tests/django_tasks_settings.py configures the ``TASKS`` aliases).  Each
``supports_*`` flag the backend sets has a test here that runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django", reason="packmule[django] is not installed")  # (scripts/test installs it)
if importlib.util.find_spec("django.tasks") is None:  # (Django 5.2: the backport)
    pytest.importorskip("django_tasks", reason="packmule[django] is not installed")

import django  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402

from conformance.harness import Harness, beanstalk_harness, local_harness  # noqa: E402

SETTINGS = "tests.django_tasks_settings"
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # s: the longest a task here may take to finish before the test fails


@pytest.fixture(scope="module", params=["local", "beanstalk"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Workers of one packmule backend that find the Django settings in their
    environment, as ``packmule worker`` would; this process uses the same
    backend (its ``PACKMULE_*`` variables) and settings."""
    factory = local_harness if request.param == "local" else beanstalk_harness
    before = {key: value for key, value in os.environ.items() if key.startswith("PACKMULE_")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_SETTINGS_MODULE", SETTINGS)  # (before the workers start: they inherit it)
        django.setup()
        try:
            with factory() as h:
                os.environ.update(h.env)
                yield h
        finally:
            # (the PACKMULE_* variables as they were: a backend built here exports its own, which must
            # not outlive it, or the next test's processes would join a coordinator that is gone)
            for key in [key for key in os.environ if key.startswith("PACKMULE_")]:
                del os.environ[key]
            os.environ.update(before)


@pytest.fixture(scope="module")
def tasks(harness: Harness) -> types.ModuleType:
    from tests import django_tasks_tasks

    return django_tasks_tasks


@pytest.fixture(scope="module")
def api(harness: Harness) -> Any:
    from packmule.contrib.django._tasks_compat import API

    return API


def finished(result: Any, timeout: float = WAIT) -> Any:
    """``result`` refreshed until its task is SUCCESSFUL or FAILED."""
    deadline = time.monotonic() + timeout
    while True:
        result.refresh()
        if result.is_finished:
            return result
        assert time.monotonic() < deadline, f"task {result.id} still {result.status} after {timeout}s"
        time.sleep(0.02)


def until_status(result: Any, status: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result.refresh()
        if result.status == status:
            return result
        assert time.monotonic() < deadline, f"task {result.id} still {result.status}, not {status}"
        time.sleep(0.02)


def queued(h: Harness) -> tuple[int, int, int]:
    stats = h.backend.queue.stats()
    return stats.ready, stats.reserved, stats.delayed


def signals(path: Path, count: int = 0) -> list[dict[str, Any]]:
    """The signals logged to ``path``, once there are ``count`` of them:
    task_enqueued first, then the worker's in the order it sent them (the worker
    may start before the enqueuing process sends task_enqueued, once the job is
    queued; it sends task_finished once the result reads as finished)."""
    deadline = time.monotonic() + WAIT
    while True:
        seen = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(seen) >= count or time.monotonic() > deadline:
            return sorted(seen, key=lambda s: s["event"] != "enqueued")
        time.sleep(0.02)


# --- the flags --------------------------------------------------------------------------------------------
def test_the_backend_claims_exactly_the_four_features_tested_here(harness, api):
    from packmule.contrib.django.tasks import PackmuleBackend

    flags = {name: getattr(PackmuleBackend, name) for name in dir(PackmuleBackend) if name.startswith("supports_")}
    assert flags == {"supports_async_task": True, "supports_defer": True, "supports_get_result": True,
                     "supports_priority": True}
    assert isinstance(api.task_backends["default"], PackmuleBackend)


# --- enqueue and results ----------------------------------------------------------------------------------
def test_enqueue_returns_a_ready_result_with_a_string_id_under_64_characters(harness, tasks, api):
    result = tasks.add.enqueue(2, b=3)
    assert isinstance(result.id, str) and 0 < len(result.id) < 64
    assert result.status == api.TaskResultStatus.READY
    assert result.task is tasks.add and result.backend == "default"
    assert (result.args, result.kwargs) == ([2], {"b": 3})
    assert result.enqueued_at is not None and result.enqueued_at.utcoffset() is not None
    assert (result.started_at, result.finished_at, result.errors, result.worker_ids) == (None, None, [], [])
    assert finished(result).return_value == 5


def test_a_task_runs_in_a_packmule_worker_process_and_reads_back_successful(harness, tasks, api):
    result = finished(tasks.whoami.enqueue())
    assert result.status == api.TaskResultStatus.SUCCESSFUL
    pid = result.return_value
    assert pid != os.getpid() and pid in harness.worker_pids()
    assert len(result.worker_ids) == 1 and result.worker_ids[0].endswith(f":{pid}")
    assert result.enqueued_at <= result.started_at == result.last_attempted_at <= result.finished_at
    again = tasks.whoami.get_result(result.id)
    assert again.task.func is tasks.whoami.func and again.return_value == pid


def test_a_result_reads_back_as_the_immediate_backend_gives_it(harness, tasks, api):
    args = ((1, 2), b"bytes", {"k": (True, None, 1.5)}, "\u00e9")
    kwargs = {"nested": {"list": [(3,)], "text": b"b"}}
    ours = finished(tasks.echo.enqueue(*args, **kwargs))
    theirs = tasks.echo.using(backend="immediate").enqueue(*args, **kwargs)
    assert theirs.status == ours.status == api.TaskResultStatus.SUCCESSFUL
    assert ours.return_value == theirs.return_value == [[[1, 2], "bytes", {"k": [True, None, 1.5]}, "\u00e9"],
                                                        {"nested": {"list": [[3]], "text": "b"}}]
    assert (ours.args, ours.kwargs) == (theirs.args, theirs.kwargs)
    assert tasks.echo.get_result(ours.id).return_value == theirs.return_value


def test_a_large_return_value_reads_back_whole(harness, tasks):
    big = "x" * 2_000_000  # (over a memcached item: kept in chunks)
    assert finished(tasks.echo.enqueue(big)).return_value == [[big], {}]


@pytest.mark.parametrize(("args", "error"), [(({1: "a"},), ValueError), ((float("nan"),), ValueError),
                                             (({"a": {2}},), TypeError), ((object(),), TypeError)],
                         ids=["int-key", "nan", "set", "object"])
def test_arguments_that_do_not_survive_a_json_round_trip_are_refused_with_nothing_queued(harness, tasks, tmp_path,
                                                                                          args, error):
    log = tmp_path / "signals.jsonl"
    before = queued(harness)
    with pytest.raises(error):
        tasks.echo.enqueue(*args, log=str(log))
    assert queued(harness) == before
    assert signals(log) == []


@pytest.mark.parametrize(("value_repr", "error"), [("{1: 'a'}", "builtins.ValueError"),
                                                   ("nan", "builtins.ValueError"),
                                                   ("{1, 2}", "builtins.TypeError")],
                         ids=["int-key", "nan", "set"])
def test_a_return_value_that_does_not_survive_a_json_round_trip_fails_the_task(harness, tasks, api, value_repr,
                                                                               error):
    result = finished(tasks.returns.enqueue(value_repr))
    assert result.status == api.TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == [error]


def test_get_result_reads_the_same_result_in_another_process(harness, tasks):
    result = finished(tasks.add.enqueue(20, 22))
    code = ("import json, sys, django; django.setup()\n"
            "from packmule.contrib.django._tasks_compat import API\n"
            "r = API.task_backends['default'].get_result(sys.argv[1])\n"
            "print(json.dumps({'task': r.task.module_path, 'status': str(r.status), 'value': r.return_value,\n"
            "  'args': r.args, 'workers': r.worker_ids, 'times': [str(t) for t in (r.enqueued_at, r.started_at,\n"
            "  r.last_attempted_at, r.finished_at)]}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, result.id], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == {"task": "tests.django_tasks_tasks.add", "status": "SUCCESSFUL", "value": 42, "args": [20, 22],
                    "workers": result.worker_ids,
                    "times": [str(t) for t in (result.enqueued_at, result.started_at, result.last_attempted_at,
                                               result.finished_at)]}


@pytest.mark.parametrize("result_id", [uuid.uuid4().hex, "../../pm/x", "", "A" * 32, "a b\r\nflush_all", "a" * 300],
                         ids=["never-made", "path", "empty", "upper", "protocol", "long"])
def test_an_unknown_result_id_raises_task_result_does_not_exist(harness, api, result_id):
    backend = api.task_backends["default"]
    with pytest.raises(api.TaskResultDoesNotExist):
        backend.get_result(result_id)
    with pytest.raises(api.TaskResultDoesNotExist):
        asyncio.run(backend.aget_result(result_id))


def test_a_result_is_kept_as_long_as_a_runs_state(harness, tasks, api, tmp_path, monkeypatch):
    # Given both job slots held, so that a task enqueued now stays queued
    gate = tmp_path / "open"
    gates = []
    for _ in range(2):
        gates.append(tasks.wait_for.enqueue(str(gate)))
        until_status(gates[-1], "RUNNING")
    # When it is enqueued by a process whose runs' state lives 1 s (PACKMULE_STATE_TTL)
    monkeypatch.setenv("PACKMULE_STATE_TTL", "1")
    result = tasks.add.enqueue(1, 2)
    monkeypatch.delenv("PACKMULE_STATE_TTL")
    result.refresh()
    # Then its result is gone with it
    time.sleep(3.0)
    with pytest.raises(api.TaskResultDoesNotExist):
        result.refresh()
    gate.touch()
    assert [finished(g).status for g in gates] == ["SUCCESSFUL"] * 2


# --- failures and retries ---------------------------------------------------------------------------------
def test_a_task_that_raises_is_failed_with_its_exception_class_path_and_remote_traceback(harness, tasks, api):
    result = finished(tasks.fail.enqueue())
    assert result.status == api.TaskResultStatus.FAILED
    assert len(result.errors) == 1 == len(result.worker_ids)
    error = result.errors[0]
    assert error.exception_class_path == "tests.django_tasks_tasks.Flaky"
    assert error.exception_class is tasks.Flaky
    assert 'raise Flaky("no luck")' in error.traceback and "in fail" in error.traceback
    assert error.traceback.rstrip().endswith("Flaky: no luck")
    assert result.finished_at is not None and result.finished_at >= result.started_at
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value


def test_a_result_read_just_before_its_task_failed_reads_the_workers_last_record(harness, tasks, api,
                                                                                   monkeypatch):
    import packmule.contrib.django.tasks as module

    # Given a failed task whose record is first read as it was while it ran (packmule then counts its job failed)
    result = finished(tasks.fail.enqueue())
    run = module._TaskJobs(module.RUN_PREFIX + result.id)
    deadline = time.monotonic() + WAIT
    while run.update_progress().failed < 1:  # (the worker wrote the record first)
        assert time.monotonic() < deadline, f"packmule never counted the job of {result.id} failed"
        time.sleep(0.02)
    read, reads = module._Records.read, []

    def stale_first(self: Any, result_id: str) -> Any:
        record = read(self, result_id)
        reads.append(result_id)
        if len(reads) == 1:
            record.update(status="RUNNING", errors=[], finished_at=None)
        return record

    monkeypatch.setattr(module._Records, "read", stale_first)
    # Then it reads as the task's own failure, not packmule's
    again = tasks.fail.get_result(result.id)
    assert again.status == api.TaskResultStatus.FAILED
    assert [e.exception_class_path for e in again.errors] == ["tests.django_tasks_tasks.Flaky"]


def test_an_exception_class_path_is_its_module_and_qualified_name(harness, tasks, api):
    result = finished(tasks.fail_nested.enqueue())
    assert [e.exception_class_path for e in result.errors] == ["tests.django_tasks_tasks.Errors.Nested"]
    assert result.errors[0].exception_class_path == tasks.fail_nested.using(backend="immediate").enqueue().errors[
        0].exception_class_path


def test_retries_are_attempts_one_worker_id_and_one_error_each(harness, tasks, api):
    result = finished(tasks.flaky.enqueue(3))  # (TASKS["retrying"]: max_retries 2)
    assert result.status == api.TaskResultStatus.SUCCESSFUL and result.return_value == 3
    assert result.attempts == len(result.worker_ids) == 3
    assert [e.exception_class_path for e in result.errors] == ["tests.django_tasks_tasks.Flaky"] * 2
    assert "attempt 1 of 3" in result.errors[0].traceback and "attempt 2 of 3" in result.errors[1].traceback
    assert result.started_at < result.last_attempted_at < result.finished_at


def test_a_task_failing_every_retry_is_failed_after_its_last_attempt(harness, tasks, api):
    result = finished(tasks.flaky.enqueue(9))
    assert result.status == api.TaskResultStatus.FAILED
    assert len(result.worker_ids) == len(result.errors) == 3
    assert "attempt 3 of 9" in result.errors[-1].traceback


def test_a_task_that_kills_its_worker_is_failed_once_packmule_gives_up_on_it(harness, tasks, api):
    result = finished(tasks.crash.enqueue(), timeout=120)
    assert result.status == api.TaskResultStatus.FAILED
    assert len(result.worker_ids) == 3  # (packmule's max_crashes)
    assert result.errors[-1].exception_class_path == "packmule._core.errors.JobFailed"
    assert "WorkerCrashed" in result.errors[-1].traceback


# --- signals ------------------------------------------------------------------------------------------------
def test_signals_enqueued_here_started_and_finished_by_the_worker(harness, tasks, tmp_path):
    log = tmp_path / "signals.jsonl"
    result = finished(tasks.add.enqueue(1, 2, log=str(log)))
    seen = signals(log, 3)
    assert [s["event"] for s in seen] == ["enqueued", "started", "finished"]
    assert {s["sender"] for s in seen} == {"packmule.contrib.django.tasks.PackmuleBackend"}
    assert {s["id"] for s in seen} == {result.id}
    assert seen[0]["pid"] == os.getpid() and seen[0]["status"] == "READY"
    worker = result.worker_ids[0].rpartition(":")[2]
    assert [str(s["pid"]) for s in seen[1:]] == [worker, worker] != [str(os.getpid())] * 2
    assert [s["status"] for s in seen[1:]] == ["RUNNING", "SUCCESSFUL"]
    assert seen[2]["raised"] is None


def test_task_finished_is_sent_inside_the_except_when_the_task_raised(harness, tasks, tmp_path):
    log = tmp_path / "signals.jsonl"
    finished(tasks.fail.enqueue(log=str(log)))
    seen = signals(log, 3)
    assert [s["event"] for s in seen] == ["enqueued", "started", "finished"]
    assert (seen[2]["status"], seen[2]["raised"]) == ("FAILED", "Flaky")


# --- context, async -----------------------------------------------------------------------------------------
def test_a_task_that_takes_context_gets_its_task_context_first(harness, tasks):
    result = finished(tasks.context_of.enqueue("x"))
    assert result.return_value == {"id": result.id, "attempt": 1, "tag": "x", "args": ["x"],
                                   "worker_ids": result.worker_ids}


def test_an_async_task_runs_in_the_worker(harness, tasks, api):
    async def enqueue_and_read() -> Any:
        result = await tasks.async_pid.aenqueue(21)
        deadline = time.monotonic() + WAIT
        while not result.is_finished:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
            result = await tasks.async_pid.aget_result(result.id)
        return result

    result = asyncio.run(enqueue_and_read())
    assert result.status == api.TaskResultStatus.SUCCESSFUL
    pid, doubled = result.return_value
    assert doubled == 42 and pid != os.getpid() and pid in harness.worker_pids()


# --- priority and run_after ------------------------------------------------------------------------------
def test_priority_orders_the_ready_tasks_higher_first(harness, tasks, tmp_path):
    # Given both job slots held by a task (both harnesses serve 2 jobs at once), one to stay held
    held, freed = tmp_path / "held", tmp_path / "freed"
    gates = []
    for path in (held, freed):
        gates.append(tasks.wait_for.enqueue(str(path)))
        until_status(gates[-1], "RUNNING")
    # When low and high priority tasks are queued, low first, and one slot is let go
    lows = [tasks.add.using(priority=-10).enqueue(i, 0) for i in range(3)]
    highs = [tasks.add.using(priority=10).enqueue(i, 0) for i in range(3)]
    freed.touch()
    # Then that slot ran them one by one, every high priority task first
    started = sorted((finished(r).started_at, "high" if r in highs else "low") for r in lows + highs)
    assert [which for _, which in started] == ["high"] * 3 + ["low"] * 3, started
    held.touch()
    assert [finished(g).status for g in gates] == ["SUCCESSFUL"] * 2


def test_run_after_holds_the_task_until_then(harness, tasks, api):
    run_after = datetime.now(timezone.utc) + timedelta(seconds=2)
    result = tasks.add.using(run_after=run_after).enqueue(1, 1)
    assert result.task.run_after == run_after
    time.sleep(1.0)
    result.refresh()
    assert result.status == api.TaskResultStatus.READY
    finished(result)
    assert result.started_at >= run_after and result.return_value == 2
    assert tasks.add.get_result(result.id).task.run_after == run_after


# --- bad input --------------------------------------------------------------------------------------------
def _invalid(tasks: types.ModuleType, which: str) -> Any:
    """A Task that passed Django's checks when it was made, changed afterwards so
    that it no longer would (``enqueue`` must check it again)."""
    task = tasks.add

    def nested(a: int, b: int) -> int:
        return a + b

    changes = {
        "nested": {"func": nested},
        "plain-function": {"func": tasks.plain},
        "bool-priority": {"priority": True},
        "priority-101": {"priority": 101},
        "naive-run-after": {"run_after": datetime.now() + timedelta(seconds=5)},
        "timedelta-run-after": {"run_after": timedelta(seconds=5)},
        "run-after-past-state-ttl": {"run_after": datetime.now(timezone.utc) + timedelta(days=30)},
        "unknown-queue": {"queue_name": "nope"},
    }[which]
    copy = dataclasses.replace(task)
    for field, value in changes.items():
        object.__setattr__(copy, field, value)
    return copy


@pytest.mark.parametrize("which", ["nested", "plain-function", "bool-priority", "priority-101", "naive-run-after",
                                   "timedelta-run-after", "run-after-past-state-ttl", "unknown-queue"])
def test_an_invalid_task_raises_invalid_task_with_nothing_queued(harness, tasks, api, tmp_path, monkeypatch, which):
    import packmule.contrib.django.tasks as module

    log = tmp_path / "signals.jsonl"
    planned = uuid.uuid4()  # (the id enqueue would give its result)
    monkeypatch.setattr(module, "uuid", types.SimpleNamespace(uuid4=lambda: planned))
    before = queued(harness)
    with pytest.raises(api.InvalidTask):
        _invalid(tasks, which).enqueue(1, 2, log=str(log))
    assert queued(harness) == before
    assert signals(log) == []
    with pytest.raises(api.TaskResultDoesNotExist):
        api.task_backends["default"].get_result(planned.hex)


@pytest.mark.parametrize("options", [{"priority": True}, {"priority": 101}, {"queue_name": "nope"},
                                     {"run_after": datetime.now() + timedelta(seconds=5)}],
                         ids=["bool-priority", "priority-101", "unknown-queue", "naive-run-after"])
def test_a_task_is_refused_as_it_is_made_with_options_the_backend_cannot_honour(harness, tasks, api, options):
    with pytest.raises(api.InvalidTask):
        tasks.add.using(**options)


def test_a_task_defined_in_main_is_refused_as_it_is_made(harness, tasks, api):
    def main_task(a: int) -> int:  # (as if the program's script defined it: no worker can import it)
        return a

    main_task.__module__, main_task.__qualname__ = "__main__", "main_task"
    with pytest.raises(api.InvalidTask, match="__main__"):
        dataclasses.replace(tasks.add, func=main_task)


def test_a_naive_run_after_is_refused_without_use_tz_too(harness, tasks, api):
    from django.test import override_settings

    with override_settings(USE_TZ=False), pytest.raises(api.InvalidTask, match="aware"):
        tasks.add.using(run_after=datetime.now() + timedelta(seconds=5))


def test_a_queue_the_alias_configures_takes_tasks(harness, tasks):
    assert finished(tasks.send_email.enqueue("a@example.com")).return_value == "a@example.com"


@pytest.mark.parametrize("options", [{"max_retries": -1}, {"time_to_run": 0}, {"retries": 2}, {"backend": 3}])
def test_bad_options_are_refused_when_the_backend_is_built(harness, options):
    from packmule.contrib.django.tasks import PackmuleBackend

    with pytest.raises(ImproperlyConfigured):
        PackmuleBackend("bad", {"OPTIONS": options})


# --- where django.tasks comes from -----------------------------------------------------------------------
def test_the_backport_is_used_where_django_has_no_django_tasks(harness, api):
    if importlib.util.find_spec("django.tasks") is not None:
        pytest.skip("this Django has django.tasks (6.0+): the test below pins that switch")
    import django_tasks

    assert (api.source, api.Task, api.InvalidTask) == ("django_tasks", django_tasks.base.Task,
                                                       django_tasks.exceptions.InvalidTaskError)


def test_django_tasks_is_used_where_django_has_it(harness, monkeypatch):
    from packmule.contrib.django import _tasks_compat

    fakes = {name: types.ModuleType(name) for name in (
        "django.tasks", "django.tasks.base", "django.tasks.backends", "django.tasks.backends.base",
        "django.tasks.exceptions", "django.tasks.signals", "django.utils.json")}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
        for attr in ("Task", "TaskContext", "TaskError", "TaskResult", "TaskResultStatus", "BaseTaskBackend",
                     "InvalidTask", "TaskResultDoesNotExist", "task_backends", "task_enqueued", "task_started",
                     "task_finished", "normalize_json"):
            setattr(module, attr, f"{name}.{attr}")
    picked = _tasks_compat.resolve()
    assert picked.source == "django.tasks"
    assert picked.BaseTaskBackend == "django.tasks.backends.base.BaseTaskBackend"
    assert picked.InvalidTask == "django.tasks.exceptions.InvalidTask"
    assert picked.normalize_json == "django.utils.json.normalize_json"
