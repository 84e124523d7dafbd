"""The dashboard as an ASGI app (Starlette): pages, JSON API, event streams,
metrics, the progress element's script.  Every read of the store runs in a
worker thread; the event loop only waits."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from packmule._core import config as _config
from packmule._driver.watcher import RunInfo, Watcher
from packmule._model.keys import NAME_RE
from packmule.scheduling import published
from packmule.web import _pages
from packmule.web._metrics import exposition
from packmule.web._security import Guard

Allow = Callable[[Request, str, str], "bool | Awaitable[bool]"]
EVENT_EVERY = 0.5  # s between two looks at a run for its event stream
KEEPALIVE_EVERY = 15.0  # s: an event stream with no change sends a comment, so a gone client is noticed
ENDED = ("cancelled", "lost")  # states that end an event stream, besides complete
MAX_RUNS = 1000


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, default=repr, allow_nan=False)
    return Response(body, status, media_type="application/json", headers={"cache-control": "no-store"})


def _not_found(name: str) -> Response:
    return _json({"error": f"no run named {name!r}"}, 404)


class _Views:
    """The handlers, sharing one watcher (built at first use) and the allow hook."""

    def __init__(self, watcher: Watcher | None, allow: Allow | None) -> None:
        self._watcher, self._allow = watcher, allow
        self._lock = threading.Lock()
        self.metrics = exposition(self.watcher)

    def watcher(self) -> Watcher:
        if self._watcher is None:
            with self._lock:
                if self._watcher is None:
                    self._watcher = Watcher()
        return self._watcher

    async def call(self, method: str, *args: Any) -> Any:
        """``Watcher.<method>(*args)`` in a worker thread."""
        return await run_in_threadpool(getattr(self.watcher(), method), *args)

    async def allowed(self, request: Request, name: str, action: str) -> bool:
        if self._allow is None:
            return True
        verdict = self._allow(request, name, action)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def visible_run(self, request: Request) -> RunInfo | None:
        """The run the path names, if it exists and this request may view it."""
        name = request.path_params["name"]
        if not NAME_RE.match(name) or not await self.allowed(request, name, "view"):
            return None
        info: RunInfo | None = await self.call("run", name)
        return info

    # --- pages ------------------------------------------------------------------------
    def page_of(self, page: str) -> Callable[[Request], Awaitable[Response]]:
        async def show(request: Request) -> Response:
            return HTMLResponse(_pages.render(page, request.scope.get("root_path", "")),
                                headers={"cache-control": "no-store"})
        return show

    async def run_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not NAME_RE.match(name) or not await self.allowed(request, name, "view"):
            return HTMLResponse("<!doctype html><title>not found</title><p>no such run", 404)
        return HTMLResponse(_pages.render("run", request.scope.get("root_path", ""), name),
                            headers={"cache-control": "no-store"})

    # --- API --------------------------------------------------------------------------
    async def runs(self, request: Request) -> Response:
        try:
            limit = min(max(int(request.query_params.get("limit", MAX_RUNS)), 1), MAX_RUNS)
        except ValueError:
            return _json({"error": "limit must be a whole number"}, 400)
        infos: list[RunInfo] = await self.call("runs", request.query_params.get("name", ""), limit)
        return _json([info.as_dict() for info in infos if await self.allowed(request, info.name, "view")])

    async def run(self, request: Request) -> Response:
        info = await self.visible_run(request)
        if info is None:
            return _not_found(request.path_params["name"])
        failures = await self.call("failures", info)
        value = await self.call("value_repr", info)
        return _json({**info.as_dict(), "failures": failures, "value": value})

    async def events(self, request: Request) -> Response:
        first = await self.visible_run(request)
        if first is None:
            return _not_found(request.path_params["name"])
        return StreamingResponse(self._stream(first), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def _stream(self, info: RunInfo | None) -> AsyncIterator[str]:
        """One ``data:`` event per change of the run; ends after the one that says it is
        complete (or cancelled, or lost), or with an ``event: gone`` once it is forgotten."""
        assert info is not None
        name, last, quiet_since = info.name, None, time.monotonic()
        while True:
            if info is None:
                yield f"event: gone\ndata: {json.dumps({'name': name})}\n\n"
                return
            key = (info.generation, info.done, info.total, info.failed, info.state, info.complete)
            if key != last:
                last, quiet_since = key, time.monotonic()
                yield f"data: {json.dumps(info.as_dict(), default=repr)}\n\n"
                if info.complete or info.state in ENDED:
                    return
            elif time.monotonic() - quiet_since > KEEPALIVE_EVERY:
                quiet_since = time.monotonic()
                yield ": still running\n\n"
            await asyncio.sleep(EVENT_EVERY)
            info = await self.call("run", name)

    async def act(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("cancel", "forget"):
            return _json({"error": f"no action {action!r}: POST cancel or forget"}, 404)
        info = await self.visible_run(request)
        if info is None:
            return _not_found(request.path_params["name"])
        if not await self.allowed(request, info.name, action):
            return _json({"error": f"you may not {action} run {info.name!r}"}, 403)
        await self.call(action, info.name)
        after: RunInfo | None = await self.call("run", info.name)
        return _json({"name": info.name, "action": action, "run": after.as_dict() if after else None})

    async def workers(self, request: Request) -> Response:
        out = []
        for worker in await self.call("workers"):
            data = worker.as_dict()
            running = [job for job in data["running"]
                       if await self.allowed(request, job.partition("/")[0], "view")]
            data["running"], data["running_hidden"] = running, len(data["running"]) - len(running)
            out.append(data)
        return _json(out)

    async def queue(self, request: Request) -> Response:
        queue = await self.call("queue")
        return _json({server: _stats(stats) for server, stats in queue.items()})

    async def servers(self, request: Request) -> Response:
        states = await self.call("servers")
        return _json([_stats(state) for state in states])

    async def schedules(self, request: Request) -> Response:
        """Each schedule the schedulers noted, with its next fire time, its last
        tick, that run's state and its totals (the tick runs this request may not view: their names hidden)."""
        out = await run_in_threadpool(published, self.watcher().backend)
        for entry in out:
            if entry["last_run"] is not None and not await self.allowed(request, entry["last_run"], "view"):
                entry["last_run"], entry["state"] = None, "hidden"
        return _json(out)

    async def prometheus(self, request: Request) -> Response:
        body = await run_in_threadpool(self.metrics)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8",
                        headers={"cache-control": "no-store"})


def _stats(stats: Any) -> dict[str, Any]:
    if hasattr(stats, "_asdict"):
        return dict(stats._asdict())
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return dict(stats)


PROGRESS_JS = resources.files("packmule.web").joinpath("static/progress.js").read_bytes()


async def _progress_js(request: Request) -> Response:
    return Response(PROGRESS_JS, media_type="text/javascript; charset=utf-8",
                    headers={"cache-control": "no-cache"})


def create_app(watcher: Watcher | None = None, *, token: str | None = None, allow: Allow | None = None,
               loopback_hosts_only: bool = False) -> Starlette:
    """The dashboard as a Starlette app, to serve or to mount under a prefix.

    ``watcher``: the ``packmule._driver.watcher.Watcher`` to read (None: one for the backend the
    PACKMULE_* variables name, built at the first request).  ``token``: required on every
    request when given.  ``allow(request, run_name, action) -> bool`` (or an awaitable),
    action in 'view', 'cancel', 'forget': whether this request may see the run (its row,
    page, failures, value, events) or act on it; runs it may not view answer 404, actions
    it may not take 403.  It is called once per run listed, in the event loop: keep it quick.
    ``loopback_hosts_only``: answer only requests whose Host is a loopback name (what
    ``serve`` sets when it runs open on loopback: a guard against DNS rebinding).
    """
    views = _Views(watcher, allow)
    routes = [
        Route("/", views.page_of("runs")),
        Route("/runs/{name}", views.run_page),
        Route("/workers", views.page_of("workers")),
        Route("/queue", views.page_of("queue")),
        Route("/schedules", views.page_of("schedules")),
        Route("/api/runs", views.runs),
        Route("/api/runs/{name}", views.run),
        Route("/api/runs/{name}/events", views.events),
        Route("/api/runs/{name}/{action:str}", views.act, methods=["POST"]),
        Route("/api/workers", views.workers),
        Route("/api/queue", views.queue),
        Route("/api/servers", views.servers),
        Route("/api/schedules", views.schedules),
        Route("/metrics", views.prometheus),
        Route("/static/progress.js", _progress_js),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token,
                                                          loopback_hosts_only=loopback_hosts_only)])
    app.state.packmule_views = views
    return app


class LazyApp:
    """``packmule.web.app``: the dashboard built from the environment
    (PACKMULE_DASHBOARD_TOKEN, the PACKMULE_* backend variables) at its first request."""

    def __init__(self) -> None:
        self._app: Starlette | None = None
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = create_app(token=_config.dashboard_token())
        await self._app(scope, receive, send)
