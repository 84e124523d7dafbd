"""``manage.py check``'s packmule messages (tag ``packmule``).

- ``packmule.E001``: a cluster backend without ``SECRET`` (nor ``INSECURE``).
- ``packmule.W002``: the local backend under a server of several processes.
- ``packmule.E003``: an in-memory SQLite database, which worker processes cannot see.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from django.conf import settings
from django.core import checks

from packmule.contrib.django import conf

__all__ = ["check_database", "check_local_backend", "check_secret", "multiprocess_server"]

TAG = "packmule"


def check_secret(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    env = conf.effective(conf.packmule_setting())
    backend = env.get("PACKMULE_BACKEND") or "local"
    if backend == "local" or env.get("PACKMULE_SECRET") or env.get("PACKMULE_INSECURE") == "1":
        return []
    return [checks.Error(
        f"the {backend!r} backend has no secret: its workers refuse unsigned jobs, and jobs are pickles that "
        "any process reaching the queue could forge",
        hint="set PACKMULE = {..., 'SECRET': ...} (the same on every machine; read it from the environment or a "
             "file, not from the settings' source), or the PACKMULE_SECRET variable; 'INSECURE': True only on "
             "private servers",
        id="packmule.E001")]


def multiprocess_server() -> str | None:
    """What says this process is (or will be) one of several serving the site, or None."""
    concurrency = os.environ.get("WEB_CONCURRENCY", "")
    if concurrency.isdigit() and int(concurrency) > 1:
        return f"WEB_CONCURRENCY={concurrency}"
    if "gunicorn" in os.path.basename(sys.argv[0] if sys.argv else ""):
        args = sys.argv[1:] + shlex.split(os.environ.get("GUNICORN_CMD_ARGS", ""))
        for i, arg in enumerate(args):
            value = arg.split("=", 1)[1] if arg.startswith("--workers=") else (
                args[i + 1] if arg in ("-w", "--workers") and i + 1 < len(args) else None)
            if value is not None and value.isdigit() and int(value) > 1:
                return f"gunicorn --workers {value}"
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None and getattr(uwsgi, "numproc", 1) > 1:
        return f"uWSGI with {uwsgi.numproc} processes"
    return None


def check_local_backend(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    env = conf.effective(conf.packmule_setting())
    server = multiprocess_server()
    if (env.get("PACKMULE_BACKEND") or "local") != "local" or server is None:
        return []
    return [checks.Warning(
        f"the local backend under a server of several processes ({server}): each process starts a backend of its "
        "own, so a run started in one process is invisible to the others (its progress, its value, the "
        "dashboard); a request served by another process finds no such run",
        hint="use a cluster backend (PACKMULE = {'BACKEND': 'beanstalk', ...}) with `manage.py packmule_worker`, "
             "or serve the site with one process",
        id="packmule.W002")]


def check_database(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    return [checks.Error(
        f"database {alias!r} is an in-memory SQLite database: packmule's worker processes each open an empty one "
        "of their own, so jobs never see this process's rows",
        hint=f"give DATABASES[{alias!r}]['NAME'] a file name, or use PostgreSQL",
        id="packmule.E003") for alias, db in settings.DATABASES.items() if conf.in_memory(db)]


for _check in (check_secret, check_local_backend, check_database):
    checks.register(_check, TAG)
