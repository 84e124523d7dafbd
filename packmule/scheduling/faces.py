"""The faces of the scheduler: ``packmule.run_schedules``, ``packmule
scheduler``, the scheduler ``packmule worker`` runs, ``packmule schedules``."""

from __future__ import annotations

import contextlib
import logging
import os

from packmule._model.schedule import Schedule
from packmule._model.scheduled import DECLARED
from packmule.backends.base import Backend
from packmule.scheduling import Scheduler, publish, published

__all__ = ["imported", "print_schedules", "run_schedules", "scheduler_main", "worker_schedules"]

log = logging.getLogger("packmule")


def run_schedules(backend: Backend | str | None = None) -> Scheduler:
    """Fire, in a daemon thread of this process, every schedule of the Runner
    classes defined so far, until the process ends (or ``.stop()``).  On the
    local backend this is how schedules run: in the program that uses it."""
    from packmule.backends import _choice

    chosen = backend if isinstance(backend, Backend) else _choice.get_backend(backend)
    return Scheduler(chosen).start()


def imported(modules: list[str]) -> dict[str, tuple[type, Schedule]]:
    """Import ``modules`` (``--import``); the schedules declared so far."""
    import importlib

    for module in modules:
        importlib.import_module(module)
    return dict(DECLARED)


def scheduler_main(modules: list[str]) -> int:
    """``packmule scheduler``: fire the schedules of ``modules`` until SIGTERM or SIGINT."""
    import signal

    from packmule.backends import _choice

    try:
        declared = imported(modules)
    except ImportError as exc:
        log.error("--import: %s (is it on PYTHONPATH, or is the cwd right?)", exc)
        return 2
    if not declared:
        log.error("no schedules: none of %s declares one (packmule.every, packmule.cron)", modules or "(no --import)")
        return 2
    scheduler = Scheduler(_choice.get_backend(), declared)
    signal.signal(signal.SIGTERM, lambda *_: scheduler._stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        scheduler.serve()
    return 0


def worker_schedules(modules: list[str], imported_already: bool = False) -> Scheduler | None:
    """What ``packmule worker`` runs beside its worker processes (unless
    ``--no-schedules``): a scheduler of the schedules its ``--import`` modules
    declare (and, ``imported_already``, those of the modules this process has
    imported: ``manage.py packmule_worker``'s apps), on a cluster backend.  (On
    ``local`` the backend lives in the program that uses it: schedules run
    there, ``run_schedules``.)"""
    if (not modules and not imported_already) or (os.environ.get("PACKMULE_BACKEND") or "local") == "local":
        return None
    try:
        declared = imported(modules)
    except ImportError:
        return None  # (the worker's own check of --import says what is wrong, and exits)
    if not declared:
        return None
    from packmule.backends import _choice

    return Scheduler(_choice.get_backend(), declared).start()


def print_schedules(modules: list[str]) -> int:
    """``packmule schedules``: each schedule of ``modules`` with its next fire
    time, its last tick and that run's state."""
    from packmule.backends import _choice

    declared = imported(modules)
    if not declared:
        print("no schedules (give the modules that declare them with --import)")
        return 0
    backend = _choice.get_backend()
    publish(backend, declared)
    for v in published(backend):
        if v["key"] in declared:
            print(f"{v['key']}  {v['kind']}  misfire={v['misfire']}  next {v['next']}  last {v['last_tick'] or '-'}"
                  f"  {v['last_run'] or ''} {v['state']}  (fired {v['fired']}, skipped {v['skipped']}, "
                  f"late {v['late']})")
    return 0
