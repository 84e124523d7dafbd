"""The ``PACKMULE`` setting: a dict whose keys are packmule's ``PACKMULE_*``
variables without the prefix, plus ``RUNNERS_MODULE``::

    PACKMULE = {"BACKEND": "beanstalk", "BEANSTALKD": "10.0.0.5:11300", "SECRET": env("PACKMULE_SECRET")}

The environment wins: a variable set in a process's environment is kept, so an
operator overrides a setting per process; the app exports the others to
``os.environ`` at ready(), so every process the project starts (worker
processes, a job's subprocesses) inherits them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = ["DATABASES_VAR", "DEFAULT_RUNNERS_MODULE", "SETTING", "SETUP_TARGET", "database_names", "effective",
           "export", "in_memory", "packmule_setting", "runners_module", "variables"]

SETTING = "PACKMULE"
RUNNERS_KEY, DEFAULT_RUNNERS_MODULE = "RUNNERS_MODULE", "runners"  # the module of each app imported at ready()
SETUP_TARGET = "packmule.contrib.django.worker:setup"  # PACKMULE_WORKER_SETUP of the project's worker processes
DATABASES_VAR = "PACKMULE_DJANGO_DATABASES"  # {alias: NAME} of the process that starts the workers (a test database)
_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def packmule_setting() -> dict[str, Any]:
    """``settings.PACKMULE`` checked ({} when unset); ImproperlyConfigured saying what is wrong."""
    value = getattr(settings, SETTING, None)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(f"settings.{SETTING} must be a dict, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str) or not _KEY.match(key):
            raise ImproperlyConfigured(f"settings.{SETTING}: {key!r} is no variable name (BACKEND, SECRET, ...)")
        if key.startswith("PACKMULE_"):
            raise ImproperlyConfigured(f"settings.{SETTING}: write {key[len('PACKMULE_'):]!r}, not {key!r}: its "
                                       "keys are the PACKMULE_* variables without the prefix")
    return dict(value)


def _text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # (a list of servers)
    raise ImproperlyConfigured(f"settings.{SETTING}[{key!r}]: give a str, a number, a bool or a list of str, "
                               f"not {type(value).__name__}")


def variables(setting: Mapping[str, Any]) -> dict[str, str]:
    """The ``PACKMULE_*`` variables the setting gives (``RUNNERS_MODULE`` is the app's own)."""
    return {f"PACKMULE_{key}": _text(key, value) for key, value in setting.items() if key != RUNNERS_KEY}


def effective(setting: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``PACKMULE_*`` variables in force: the setting's, overridden by the environment's."""
    env = os.environ if env is None else env
    return {**variables(setting), **{k: v for k, v in env.items() if k.startswith("PACKMULE_")}}


def export(setting: Mapping[str, Any]) -> list[str]:
    """Put the setting's variables into ``os.environ`` where unset; the names put."""
    put = []
    for var, value in variables(setting).items():
        if var not in os.environ:
            os.environ[var] = value
            put.append(var)
    return put


def runners_module(setting: Mapping[str, Any]) -> str:
    name = setting.get(RUNNERS_KEY, DEFAULT_RUNNERS_MODULE)
    if not isinstance(name, str) or not name.isidentifier():
        raise ImproperlyConfigured(f"settings.{SETTING}[{RUNNERS_KEY!r}]={name!r}: give a module name, such as "
                                   f"{DEFAULT_RUNNERS_MODULE!r}")
    return name


def in_memory(database: Mapping[str, Any]) -> bool:
    """Whether a ``DATABASES`` entry is an in-memory SQLite database (each process has its own, empty)."""
    if "sqlite" not in str(database.get("ENGINE", "")):
        return False
    name = database.get("NAME")
    return not isinstance(name, os.PathLike) and (not name or name == ":memory:" or "mode=memory" in str(name))


def database_names() -> dict[str, str]:
    """{alias: NAME} of this process's databases (after a test run made its test databases, theirs)."""
    return {alias: str(db.get("NAME", "")) for alias, db in settings.DATABASES.items()}


def use_database_names(env: Mapping[str, str]) -> None:
    """Point this process's databases at the names ``PACKMULE_DJANGO_DATABASES`` gives
    (a worker of a test run: the test databases its driver made)."""
    raw = env.get(DATABASES_VAR, "")
    if not raw:
        return
    from django.db import connections

    for alias, name in json.loads(raw).items():
        if alias in settings.DATABASES and settings.DATABASES[alias].get("NAME") != name:
            settings.DATABASES[alias]["NAME"] = name
            connections[alias].close()
            connections[alias].settings_dict["NAME"] = name
