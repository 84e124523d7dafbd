"""The dashboard served from a driver process (``PACKMULE_DASHBOARD_PORT``).

A local backend's runs are visible only inside the process tree of the driver
that started it, so that driver is where its dashboard must be served.  When
``PACKMULE_DASHBOARD_PORT`` is set, the first run this process starts from
outside any job serves ``packmule.web`` on that loopback port, once per
process, and says where on stderr.  Worker processes (which inherit the
variable) never serve it: their enqueues run inside a job; nor does a fork
child of a process that serves it.  The web extra is
imported only then, so the core of packmule never needs it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

from packmule._core import config as _config
from packmule._worker.engine import current

if TYPE_CHECKING:
    from packmule.backends.base import Backend

log = logging.getLogger("packmule")

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


def serve_from_driver(backend: Backend) -> None:
    """Called by each outside enqueue: serve the dashboard if PACKMULE_DASHBOARD_PORT
    asks for it and this process does not serve it yet (a cheap check otherwise)."""
    if os.getpid() in _served or current.get() is not None:
        return
    port = _config.dashboard_port()
    if port is None:
        return
    with _lock:
        if os.getpid() in _served:
            return
        try:
            import packmule.web
        except ImportError as exc:
            raise ImportError(f"PACKMULE_DASHBOARD_PORT={port} asks this process to serve the dashboard, which "
                              f"needs the web extra: pip install 'packmule[web]' ({exc})") from exc
        from packmule._model.registry import Watcher

        try:
            url = packmule.web.serve("127.0.0.1", port, watcher=Watcher(backend), background=True)
        except OSError as exc:  # the runs go on without it
            _served[os.getpid()] = f"not served: {exc}"
            log.warning("packmule: PACKMULE_DASHBOARD_PORT=%d: %s", port, exc)
            return
        _served[os.getpid()] = url
        print(f"packmule: dashboard at {url}/ (PACKMULE_DASHBOARD_PORT; it ends with this process)",
              file=sys.stderr, flush=True)
