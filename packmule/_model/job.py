"""A running job, as the code it runs sees it: its ``JobContext`` (the jobs it
enqueued and the continuations it created, buffered until its commit), the
``Spec`` a continuation is stored as, ``current`` (the job running in this
context, read by ``Runner`` to buffer instead of queueing), the time_to_run
watchdog of this worker process (for ``Runner.touch``), and the fault hooks the
fault tests arm.  The worker creates these; the driver reads them: both import
this module, neither imports the other."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from packmule._transport.wire import Task
from packmule.backends.base import Backend

__all__ = ["FAULTS", "HOOKS", "JobContext", "JobHooks", "Spec", "Touchable", "current", "watchdog"]


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


def fault(point: str) -> None:
    hook = FAULTS.pop(point, None)
    if hook is not None:
        hook()


class JobHooks:
    """Functions a framework integration (``packmule.contrib.django``) has every
    worker process call: ``before`` and ``after`` each job (a continuation too),
    ``at_exit`` when the worker stops serving (drained, or ending).  A ``before``
    hook that raises fails that job as if it had raised (retried as its options
    say); an ``after`` or ``at_exit`` hook that raises is logged, and the job's
    outcome stands.  Empty, they cost a loop over an empty list and a truth
    test per job: about 30 ns (measured with timeit), 0.4% of the 7.8 us a no-op
    job costs in all (README, "Performance")."""

    __slots__ = ("after", "at_exit", "before")

    def __init__(self) -> None:
        self.before: list[Callable[[], None]] = []
        self.after: list[Callable[[], None]] = []
        self.at_exit: list[Callable[[], None]] = []


HOOKS = JobHooks()

current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("packmule_job", default=None)


class Touchable(Protocol):
    def touch(self, handle: Any) -> None: ...


# This worker process's time_to_run watchdog (``packmule._worker.watchdog``), set
# by its Engine: ``Runner.touch`` restarts a job's clock there too.
watchdog: Touchable | None = None
