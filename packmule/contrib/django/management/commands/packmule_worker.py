"""``manage.py packmule_worker``: ``packmule worker`` with the project's settings.

Its options are ``packmule worker``'s, plus ``--reload`` (development: restart
the workers when a ``.py`` file of the project changes).  Every worker process
calls ``django.setup()`` (``PACKMULE_WORKER_SETUP``) before it imports runners:
each app's runners module comes in with the apps, no ``--import`` needed.  A
worker whose setup fails stops the command at once (exit 2, the cause named).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import connections

from packmule._core.hooks import add_worker_setup
from packmule._worker import supervisor as _supervisor
from packmule.contrib.django import conf

OPTIONS = ("concurrency", "imports", "max_jobs_per_child", "max_memory_per_child", "grace", "log_level",
           "no_schedules")


class Command(BaseCommand):
    help = "Serve packmule's queue on this machine, with this project's settings (packmule worker)."

    def add_arguments(self, parser: CommandParser) -> None:
        _supervisor.add_arguments(parser)
        parser.add_argument("--no-schedules", action="store_true",
                            help="do not fire the schedules the --import modules declare")
        parser.add_argument("--reload", action="store_true",
                            help="restart the workers when a .py file of the project changes (development)")

    def handle(self, *args: Any, **options: Any) -> None:
        a = argparse.Namespace(**{key: options[key] for key in OPTIONS})
        add_worker_setup(conf.SETUP_TARGET)  # (every worker process, and the check before them, set Django up)
        connections.close_all()  # the supervisor keeps no connection its children could inherit
        code = _reloading(options) if options["reload"] else _serve(a)
        if code:
            sys.exit(code)


def _serve(a: argparse.Namespace) -> int:
    scheduler = None
    if not a.no_schedules and a.imports:
        from packmule.scheduling import faces as scheduling  # (as the CLI's worker: scheduling's own faces)

        _supervisor.setup_logging(a.log_level)
        scheduler = scheduling.worker_schedules(a.imports)
    try:
        return _supervisor.worker_main(a)
    finally:
        if scheduler is not None:
            scheduler.stop()


def _reloading(options: dict[str, Any]) -> int:
    from packmule.contrib.django import reload

    command = [sys.executable, "-m", "django", "packmule_worker", "--concurrency", str(options["concurrency"]),
               "--grace", str(options["grace"]), "--log-level", options["log_level"]]
    for module in options["imports"]:
        command += ["--import", module]
    for key in ("max_jobs_per_child", "max_memory_per_child"):
        if options[key]:
            command += [f"--{key.replace('_', '-')}", str(options[key])]
    if options["no_schedules"]:
        command.append("--no-schedules")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # (the project, as this process has it)
    _supervisor.setup_logging(options["log_level"])
    root = Path(getattr(settings, "BASE_DIR", None) or os.getcwd())
    return reload.run(command, [root])
