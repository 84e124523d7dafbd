"""Hooks a framework integration (``packmule.contrib.django``) plugs into the
core, which never imports it.

- ``PACKMULE_WORKER_SETUP``: ``module:function[,module:function...]``, called
  once, in that order, at the start of every worker process (the local
  backend's and ``packmule worker``'s children) before it imports its runners
  or serves a job; and by ``packmule worker`` before it starts any child, so a
  setup that fails stops it at once (exit 2) instead of restarting children
  that die.  A function raises to say the process cannot serve jobs.
- ``WORKER_ENV``: functions called in a process that starts worker processes
  (the local backend, at ``ensure_workers``), each returning variables to add
  to the workers' environment; one may raise to refuse to start them (the
  Django app does for an in-memory SQLite database the workers cannot see).

The per-job hooks (around each job a worker runs) are ``packmule._model.job.HOOKS``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping

from packmule._core.errors import PackMuleError

__all__ = ["SETUP_FAILED_EXIT", "WORKER_ENV", "WORKER_SETUP_VAR", "WorkerSetupFailed", "add_worker_setup",
           "env_for_workers", "setup_worker"]

WORKER_SETUP_VAR = "PACKMULE_WORKER_SETUP"
SETUP_FAILED_EXIT = 78  # (EX_CONFIG) a worker process whose setup failed: starting another is of no use
WORKER_ENV: list[Callable[[], Mapping[str, str]]] = []


class WorkerSetupFailed(PackMuleError):
    """A ``PACKMULE_WORKER_SETUP`` function raised (or cannot be found): the process cannot serve jobs."""


def add_worker_setup(target: str, env: dict[str, str] | os._Environ[str] | None = None) -> str:
    """Add ``module:function`` to ``PACKMULE_WORKER_SETUP`` in ``env`` (default:
    ``os.environ``) unless it is there; returns the variable's new value."""
    env = os.environ if env is None else env
    listed = [t for t in env.get(WORKER_SETUP_VAR, "").split(",") if t.strip()]
    if target not in listed:
        listed.append(target)
    env[WORKER_SETUP_VAR] = ",".join(listed)
    return env[WORKER_SETUP_VAR]


def setup_worker(env: Mapping[str, str] | None = None) -> None:
    """Call each ``PACKMULE_WORKER_SETUP`` function once; ``WorkerSetupFailed``
    naming the variable, the function and why, if one cannot be found or raises."""
    raw = (os.environ if env is None else env).get(WORKER_SETUP_VAR, "")
    for target in (t.strip() for t in raw.split(",") if t.strip()):
        module, sep, name = target.partition(":")
        try:
            if not sep or not module or not name:
                raise ValueError("give module:function")
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise WorkerSetupFailed(f"{WORKER_SETUP_VAR}={raw!r}: cannot load {target!r}: {exc}") from exc
        try:
            fn()
        except Exception as exc:
            raise WorkerSetupFailed(f"{WORKER_SETUP_VAR}: {target} failed: {exc}") from exc


def env_for_workers() -> dict[str, str]:
    """What the ``WORKER_ENV`` functions add to a worker process's environment."""
    out: dict[str, str] = {}
    for fn in WORKER_ENV:
        out.update(fn())
    return out
