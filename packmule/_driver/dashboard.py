"""The dashboard served from a driver process (``PACKMULE_DASHBOARD_PORT``).

A local backend's runs are visible only inside the process tree of the driver
that started it, so that driver is where its dashboard must be served.  When
``PACKMULE_DASHBOARD_PORT`` is set, the first run this process starts from
outside any job serves ``packmule.web`` on that loopback port, once per
process, and says where on stderr.  Worker processes (which inherit the
variable) never serve it: their enqueues run inside a job; nor does a fork
child of a process that serves it.

The driver never imports ``packmule.web``: how to serve is a hook
(``install``) that ``packmule/__init__.py``, the one place that wires the faces
in, installs; it imports the web extra only when a run asks for the dashboard,
so the core of packmule never needs it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from packmule._core import config as _config

if TYPE_CHECKING:
    from packmule.backends.base import Backend

__all__ = ["Serve", "install", "serve_from_driver"]

log = logging.getLogger("packmule")

# serve(host, port, backend): serve the backend's dashboard in the background, return its URL
Serve = Callable[[str, int, "Backend"], str]
_load: Callable[[], Serve] | None = None  # how to get ``serve`` (importing the web extra), once installed

_served: dict[int, str] = {}  # pid -> the URL this process serves the dashboard at (or why not)
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A fork child of a process that serves the dashboard does not serve it: the
    dashboard (its thread is not the child's) stays the parent's, at its port."""
    global _lock
    _lock = threading.Lock()
    parent = next(iter(_served.values()), None)
    if parent is not None:
        _served[os.getpid()] = f"not served by this fork child; its parent's: {parent}"


os.register_at_fork(after_in_child=_after_fork_in_child)


def install(load: Callable[[], Serve]) -> None:
    """Set how a driver serves the dashboard: ``load()`` returns ``serve`` (it may
    raise ImportError: the web extra is not installed)."""
    global _load
    _load = load


def serve_from_driver(backend: Backend) -> None:
    """Called by each outside enqueue: serve the dashboard if PACKMULE_DASHBOARD_PORT
    asks for it and this process does not serve it yet (a cheap check otherwise)."""
    # (here, not at the top: packmule/__init__.py imports this module, and a process that never drives a run
    # - `packmule worker`'s supervisor - need not load the job model and its pickler; the caller has)
    from packmule._model.job import current

    if os.getpid() in _served or current.get() is not None:
        return
    port = _config.dashboard_port()
    if port is None:
        return
    with _lock:
        if os.getpid() in _served:
            return
        try:
            if _load is None:
                raise ImportError("no web face is installed (packmule/__init__.py installs it)")
            serve = _load()
        except ImportError as exc:
            raise ImportError(f"PACKMULE_DASHBOARD_PORT={port} asks this process to serve the dashboard, which "
                              f"needs the web extra: pip install 'packmule[web]' ({exc})") from exc

        try:
            url = serve("127.0.0.1", port, backend)
        except OSError as exc:  # the runs go on without it
            _served[os.getpid()] = f"not served: {exc}"
            log.warning("packmule: PACKMULE_DASHBOARD_PORT=%d: %s", port, exc)
            return
        _served[os.getpid()] = url
        print(f"packmule: dashboard at {url}/ (PACKMULE_DASHBOARD_PORT; it ends with this process)",
              file=sys.stderr, flush=True)
