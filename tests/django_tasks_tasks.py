"""Django tasks for tests/test_django_tasks.py, imported by the test process and,
by module and name, by the packmule workers that run them.  The signal
receivers here append one JSON line per signal to the file named by the
task's ``log`` keyword argument, from whichever process sends it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from importlib import import_module
from typing import Any

from packmule.contrib.django._tasks_compat import API

task = import_module(API.source).task  # (django.tasks.task, or the backport's)


class Flaky(Exception):
    """Raised by ``flaky`` until its last attempt."""


class Errors:
    class Nested(Exception):
        """An exception class whose qualified name is not its name."""


@task
def add(a: int, b: int, log: str | None = None) -> int:
    return a + b


@task
def echo(*args: Any, **kwargs: Any) -> Any:
    return [list(args), kwargs]


@task
def whoami() -> int:
    return os.getpid()


@task
def returns(value_repr: str) -> Any:
    """Returns ``eval(value_repr)``: values the JSON round trip changes or refuses."""
    return eval(value_repr, {"nan": float("nan")})  # (the tests' own literals)


@task
def fail(log: str | None = None) -> None:
    raise Flaky("no luck")


@task
def fail_nested() -> None:
    raise Errors.Nested("inside")


@task(takes_context=True)
def context_of(context: Any, tag: str) -> dict[str, Any]:
    return {"id": context.task_result.id, "attempt": context.attempt, "tag": tag,
            "args": context.task_result.args, "worker_ids": context.task_result.worker_ids}


@task(takes_context=True, backend="retrying")
def flaky(context: Any, succeed_at: int) -> int:
    if context.attempt < succeed_at:
        raise Flaky(f"attempt {context.attempt} of {succeed_at}")
    return int(context.attempt)


@task
async def async_pid(x: int) -> list[int]:
    await asyncio.sleep(0.01)
    return [os.getpid(), x * 2]


@task
def wait_for(path: str, timeout: float = 60.0) -> str:
    """Hold a worker until ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return path


@task
def crash() -> None:
    os._exit(3)


def plain(a: int, b: int, log: str | None = None) -> int:
    """A module-level function that is no task (a Task made of it cannot be found by its name)."""
    return a + b


@task(queue_name="emails", backend="queues")
def send_email(to: str) -> str:
    return to


def _log(event: str, sender: Any, task_result: Any) -> None:
    path = task_result.kwargs.get("log")
    if not path:
        return
    raised = sys.exc_info()[0]
    line = {"event": event, "pid": os.getpid(), "sender": f"{sender.__module__}.{sender.__qualname__}",
            "status": str(task_result.status), "id": task_result.id,
            "raised": None if raised is None else raised.__name__}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def on_enqueued(sender: Any, task_result: Any, **kwargs: Any) -> None:
    _log("enqueued", sender, task_result)


def on_started(sender: Any, task_result: Any, **kwargs: Any) -> None:
    _log("started", sender, task_result)


def on_finished(sender: Any, task_result: Any, **kwargs: Any) -> None:
    _log("finished", sender, task_result)


API.task_enqueued.connect(on_enqueued)
API.task_started.connect(on_started)
API.task_finished.connect(on_finished)
