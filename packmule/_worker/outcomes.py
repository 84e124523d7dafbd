"""What became of each job of a batch (``Outcome``), what a commit counts from
the adds it won (``Counts``), a reserved queue item's tasks (``Bundle``), and
the failure records of a job that raised or that packmule failed.  The engine
makes outcomes; the commit and the recovery read them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from packmule._core.tracebacks import describe, short_repr
from packmule._model.job import JobContext, Spec
from packmule._model.keys import job_id
from packmule._transport.wire import Task
from packmule.backends.base import Reserved

__all__ = ["STATES", "Bundle", "Counts", "Outcome", "failure_info", "log_outcomes", "packmule_failure"]

log = logging.getLogger("packmule")

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
