"""Where ``django.tasks`` lives: in Django itself from 6.0 (``django.tasks``,
Python 3.12 and later), else in the ``django-tasks`` backport (``django_tasks``,
0.12 and later, for Django 5.2 on Python 3.10 and 3.11).  ``resolve()`` picks
the first that imports and gives the names ``packmule.contrib.django.tasks``
uses under one spelling (the backport's ``InvalidTaskError`` is Django's
``InvalidTask``); ``API`` is its answer for this process."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["API", "TasksAPI", "resolve"]

DJANGO = "django.tasks"  # Django 6.0 and later
BACKPORT = "django_tasks"  # the django-tasks package (pip install "packmule[django]" on Python < 3.12)


@dataclass(frozen=True)
class TasksAPI:
    """The parts of ``django.tasks`` a task backend is built from, from one source."""

    source: str  # DJANGO or BACKPORT: the package they come from
    BaseTaskBackend: Any
    Task: Any
    TaskContext: Any
    TaskError: Any
    TaskResult: Any
    TaskResultStatus: Any
    InvalidTask: type[Exception]
    TaskResultDoesNotExist: type[Exception]
    task_backends: Any
    task_enqueued: Any
    task_started: Any
    task_finished: Any
    normalize_json: Any


def resolve() -> TasksAPI:
    """``django.tasks`` if it imports, else ``django_tasks``; ``ImportError``
    naming the extra to install if neither does."""
    try:
        importlib.import_module(DJANGO)
    except ImportError:
        try:
            importlib.import_module(BACKPORT)
        except ImportError as exc:
            raise ImportError("packmule.contrib.django.tasks needs django.tasks: Django 6.0 or later, or on "
                              "Python < 3.12 Django 5.2 and the django-tasks backport (pip install "
                              "'packmule[django]')") from exc
        return _names(BACKPORT, "django_tasks.utils")
    return _names(DJANGO, "django.utils.json")


def _names(source: str, json_module: str) -> TasksAPI:
    def part(module: str) -> Any:
        return importlib.import_module(f"{source}.{module}" if module else source)

    top, base, exceptions, signals = part(""), part("base"), part("exceptions"), part("signals")
    return TasksAPI(
        source=source,
        BaseTaskBackend=part("backends.base").BaseTaskBackend,
        Task=base.Task,
        TaskContext=base.TaskContext,
        TaskError=base.TaskError,
        TaskResult=base.TaskResult,
        TaskResultStatus=base.TaskResultStatus,
        InvalidTask=getattr(exceptions, "InvalidTask", None) or exceptions.InvalidTaskError,
        TaskResultDoesNotExist=exceptions.TaskResultDoesNotExist,
        task_backends=top.task_backends,
        task_enqueued=signals.task_enqueued,
        task_started=signals.task_started,
        task_finished=signals.task_finished,
        normalize_json=importlib.import_module(json_module).normalize_json,
    )


API = resolve()
