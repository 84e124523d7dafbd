"""packmule's web dashboard, JSON API and Prometheus metrics (the extra ``packmule[web]``).

    packmule dashboard [--host 127.0.0.1] [--port 8765] [--token T]    the command
    packmule.web.serve(port=8765, background=True)                      from a driver (the local backend)
    packmule.web.create_app(watcher, token=..., allow=...)              an ASGI app to mount in yours
    packmule.web.app                                                    the same, built from the environment

Pages: ``/`` runs, ``/runs/<name>`` one run, ``/workers``, ``/queue``.  API: ``/api/runs``,
``/api/runs/<name>``, ``/api/runs/<name>/events`` (server-sent events), ``POST
/api/runs/<name>/cancel`` and ``/forget``, ``/api/workers``, ``/api/queue``; ``/metrics``; and
``/static/progress.js``, the ``<packmule-progress run="NAME">`` element.  The core of packmule
never imports this package.
"""

from __future__ import annotations

try:
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"packmule.web needs the web extra ({exc.name} is missing): "
                      "pip install 'packmule[web]'") from exc

from packmule.web._app import LazyApp, create_app
from packmule.web._serve import Dashboard, serve

app = LazyApp()

__all__ = ["Dashboard", "app", "create_app", "serve"]
