"""Django in packmule's worker processes.

``setup`` is the project's ``PACKMULE_WORKER_SETUP``: every worker process (the
local backend's, ``packmule worker``'s children) calls it once, before it
imports runners or runs a job.  It loads the settings ``DJANGO_SETTINGS_MODULE``
names, points the databases at the names its driver passed
(``PACKMULE_DJANGO_DATABASES``: a test run's test databases), calls
``django.setup()`` (which imports each app's runners module) and installs the
per-job hooks:

- before each job, ``close_old_connections()`` (a connection past
  ``CONN_MAX_AGE``, or that failed, is closed) and, on a persistent connection,
  a health check at its first use in the job (one ``SELECT 1``), so a job after
  a database restart gets a fresh connection;
- after each job, a transaction the job left open (an ``atomic`` block never
  exited, autocommit turned off) is abandoned - its connection closed, which
  rolls it back -, a connection the job closed or broke is dropped, and
  ``close_old_connections()`` runs again;
- when the worker stops serving, every connection is closed.

A process never uses a connection (or a pool) its parent made: worker processes
are started afresh (exec), and a fork child forgets its parent's connections
without closing them (``forget_inherited_connections``, registered at ready()).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from packmule._model.job import HOOKS
from packmule.contrib.django import conf

__all__ = ["after_job", "at_exit", "before_job", "env_for_workers", "forget_inherited_connections", "setup"]

log = logging.getLogger("packmule")

_per_thread = threading.local()
_inherited: list[Any] = []  # a fork child's copies of its parent's connections: kept, never used nor closed


def setup() -> None:
    """Make this worker process a process of the project (see the module)."""
    module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module:
        raise ImproperlyConfigured(
            "DJANGO_SETTINGS_MODULE is not set: a worker process of a Django project needs the project's settings "
            "(start the workers with `python manage.py packmule_worker`, or export DJANGO_SETTINGS_MODULE)")
    import django
    from django.conf import settings

    try:
        settings.DATABASES  # noqa: B018 (loads the settings module: its errors, named, before anything else)
    except Exception as exc:
        raise ImproperlyConfigured(f"DJANGO_SETTINGS_MODULE={module!r}: the settings do not load: "
                                   f"{type(exc).__name__}: {exc}") from exc
    conf.use_database_names(os.environ)
    try:
        django.setup()
    except Exception as exc:
        raise ImproperlyConfigured(f"DJANGO_SETTINGS_MODULE={module!r}: django.setup() failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
    install_job_hooks()


def install_job_hooks() -> None:
    """Register the per-job connection handling in ``packmule._model.job.HOOKS`` (once)."""
    for hooks, fn in ((HOOKS.before, before_job), (HOOKS.after, after_job), (HOOKS.at_exit, at_exit)):
        if fn not in hooks:
            hooks.append(fn)


def _connections() -> list[Any]:
    """This thread's database wrappers, one per alias, made at its first job (a wrapper
    holds no connection until used): one look at Django's thread-local handler per
    thread instead of one per hook (``connections.all()`` costs microseconds a call)."""
    got: list[Any] | None = getattr(_per_thread, "wrappers", None)
    if got is None:
        from django.db import connections

        got = []
        for alias in connections:
            try:
                got.append(connections[alias])
            except Exception:  # (its backend does not load - a driver not installed -: no job can open it either)
                continue
        _per_thread.wrappers = got
    return got


def before_job() -> None:
    """``close_old_connections()``, and the health check of a persistent connection armed."""
    for conn in _connections():
        if conn.connection is None:
            continue
        conn.close_if_unusable_or_obsolete()
        if conn.connection is not None and conn.settings_dict.get("CONN_MAX_AGE") != 0:
            conn.health_check_enabled, conn.health_check_done = True, False  # (checked at its first use)


def after_job() -> None:
    """A transaction left open abandoned, a broken connection dropped, then ``close_old_connections()``."""
    for conn in _connections():
        if conn.connection is None and not conn.in_atomic_block:
            continue
        if conn.in_atomic_block or conn.savepoint_ids:
            _abandon_transaction(conn)
        elif _broken(conn):
            _close(conn)
        else:
            conn.close_if_unusable_or_obsolete()  # (autocommit left off, past CONN_MAX_AGE, errors)


def _broken(conn: Any) -> bool:
    """Whether the job closed or broke the driver's connection behind Django's back
    (which neither close_old_connections() nor SQLite's is_usable() notice); no round trip."""
    raw = conn.connection
    if raw is None:
        return False
    if getattr(raw, "closed", False) or getattr(raw, "broken", False):  # (psycopg)
        return True
    if conn.vendor == "sqlite":
        try:
            raw.total_changes  # noqa: B018 (raises on a closed SQLite connection)
        except Exception:
            return True
    return False


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception as exc:  # (a broken connection: gone either way)
        log.debug("closing database %r: %r", conn.alias, exc)
    conn.connection = None


def _abandon_transaction(conn: Any) -> None:
    """A job left an ``atomic`` block open: forget the block and close the connection,
    which rolls its transaction back; the next job connects afresh."""
    log.warning("a job left a transaction open on database %r: it is rolled back and its connection closed",
                conn.alias)
    conn.in_atomic_block, conn.savepoint_ids, conn.atomic_blocks = False, [], []
    conn.needs_rollback, conn.closed_in_transaction, conn.commit_on_exit = False, False, True
    conn.run_on_commit = []
    _close(conn)


def at_exit() -> None:
    from django.db import connections

    connections.close_all()
    for conn in connections.all(initialized_only=True):
        # (a pool's own connections and threads: Django 5.1+, PostgreSQL; only a pool this process
        # made: asking ``conn.pool`` of an alias that never used it would make one to close)
        if conn.alias in getattr(type(conn), "_connection_pools", {}):
            conn.close_pool()


def forget_inherited_connections() -> None:
    """(In a fork child.)  Drop the parent's connections and pools without closing
    them - closing would end the parent's sessions - so this process makes its own.
    psycopg does not close a connection it finds in another process."""
    if "django.db" not in sys.modules:
        return
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        if conn.connection is not None:
            _inherited.append(conn.connection)
            conn.connection = None
    postgresql = sys.modules.get("django.db.backends.postgresql.base")
    pools = getattr(getattr(postgresql, "DatabaseWrapper", None), "_connection_pools", None)
    if pools:
        _inherited.append(dict(pools))
        pools.clear()


def env_for_workers() -> dict[str, str]:
    """What a Django process adds to the environment of the worker processes it
    starts (``packmule._core.hooks.WORKER_ENV``): this setup, and its databases'
    names (in a test run, the test databases').  Refuses an in-memory SQLite database."""
    from django.conf import settings

    for alias, db in settings.DATABASES.items():
        if conf.in_memory(db):
            raise ImproperlyConfigured(
                f"database {alias!r} is an in-memory SQLite database (NAME {db.get('NAME')!r}): worker processes "
                "would each open an empty one of their own and never see this process's rows. Use a file (in "
                f"tests: DATABASES[{alias!r}]['TEST']['NAME'] = a file name; SQLite's test database is in memory "
                "unless it is set) or PostgreSQL")
    from packmule._core.hooks import WORKER_SETUP_VAR, add_worker_setup

    env = {WORKER_SETUP_VAR: os.environ.get(WORKER_SETUP_VAR, "")}
    add_worker_setup(conf.SETUP_TARGET, env)
    env[conf.DATABASES_VAR] = json.dumps(conf.database_names())
    return env
