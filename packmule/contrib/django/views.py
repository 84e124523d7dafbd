"""Plain Django views of packmule's runs, for WSGI and ASGI alike: the JSON that
``<packmule-progress>`` polls, its script, and what the admin's pages read.

``progress_urls(allow=None)`` gives the two URLs the element needs, laid out as
the dashboard lays them out, so ``<script src="BASE/static/progress.js">`` finds
``BASE/api/runs/<name>`` by itself::

    urlpatterns = [path("progress/", include(progress_urls(allow=my_allow)))]

``allow(request, run_name, action)`` decides, as the dashboard's hook does: a run
a request may not view answers 404.  Every read goes through one
``packmule._driver.watcher.Watcher`` per process (progress is computed there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib import resources

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import URLPattern, path
from django.views.decorators.cache import never_cache

from packmule._driver.watcher import RunInfo, Watcher
from packmule._model.keys import NAME_RE
from packmule.backends import _choice
from packmule.backends.base import Backend

__all__ = ["Allow", "PROGRESS_JS", "progress_js", "progress_urls", "run_json", "visible_run", "watcher"]

Allow = Callable[[HttpRequest, str, str], bool]
# (the element's script is a data file of the packmule package, shipped with packmule.web's
# static files; read as bytes, so the web extra need not be installed)
PROGRESS_JS = resources.files("packmule").joinpath("web/static/progress.js").read_bytes()

_current: list[tuple[Backend, Watcher]] = []  # (the backend last watched, its watcher)
_lock = threading.Lock()


def watcher() -> Watcher:
    """This process's Watcher of the backend in force (built at its first use: one per
    backend: a test's own backend is watched during that test)."""
    backend = _choice.get_backend()
    with _lock:
        if not _current or _current[0][0] is not backend:
            _current[:] = [(backend, Watcher(backend))]
        return _current[0][1]


def visible_run(request: HttpRequest, name: str, allow: Allow | None) -> RunInfo | None:
    """The run called ``name`` if it exists and ``allow`` lets this request view it."""
    if not NAME_RE.match(name) or (allow is not None and not allow(request, name, "view")):
        return None
    return watcher().run(name)


def run_json(request: HttpRequest, name: str, allow: Allow | None = None) -> HttpResponse:
    """``GET .../api/runs/<name>``: the run as the dashboard's API gives it (without
    its failures and value); 404 ``{"error": ...}`` if none."""
    info = visible_run(request, name, allow)
    if info is None:
        return JsonResponse({"error": f"no run named {name!r}"}, status=404)
    return JsonResponse(info.as_dict())


def progress_js(request: HttpRequest) -> HttpResponse:
    return HttpResponse(PROGRESS_JS, content_type="text/javascript; charset=utf-8")


def progress_urls(allow: Allow | None = None,
                  wrap: Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]] = never_cache,
                  ) -> list[URLPattern]:
    """The URLs ``<packmule-progress>`` reads: ``static/progress.js`` and ``api/runs/<name>``."""

    def one_run(request: HttpRequest, name: str) -> HttpResponse:
        return run_json(request, name, allow)

    return [path("static/progress.js", progress_js), path("api/runs/<str:name>", wrap(one_run))]
