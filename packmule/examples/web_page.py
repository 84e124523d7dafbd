"""A web app that starts a SleepyRunner run and shows its live progress bar.

    python -m packmule.examples.web_page [--port 8000] [--nap-seconds 0.2]

A Starlette app (packmule[web]) that mounts the dashboard (``packmule.web``) at
``/packmule`` and serves ``/``: a page with a Start button.  Start POSTs
``/start``, which queues ``SleepyRunner(...).run_async(100)`` without waiting
and answers the run's name; the page then shows
``<packmule-progress run="NAME">``, the element ``/packmule/static/progress.js``
defines, counting up to ``101.0 / 101.0``.  The runs also show on the dashboard
at ``/packmule/``.  On the local backend this process is the driver, so it sees
its runs.
"""

from __future__ import annotations

import argparse
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

import packmule.web
from packmule.examples.sleepy import SleepyRunner

NAPS = 100
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>packmule: start a run</title>
<script src="{root}/packmule/static/progress.js"></script></head>
<body><h1>SleepyRunner</h1>
<p><button id="start" type="button">Start</button> <span id="started"></span></p>
<div id="bars"></div>
<p><a href="{root}/packmule/">the dashboard</a></p>
<script>
"use strict";
document.getElementById('start').addEventListener('click', async () => {{
  const r = await fetch('{root}/start', {{method: 'POST', headers: {{'X-PackMule': '1'}}}});
  const run = await r.json();
  document.getElementById('started').textContent = 'started ' + run.name;
  const bar = document.createElement('packmule-progress');
  bar.setAttribute('run', run.name);
  const p = document.createElement('p');
  p.append(run.name + ': ', bar);
  document.getElementById('bars').prepend(p);
}});
</script></body></html>
"""


def make_app(nap_seconds: float = 0.2) -> Starlette:
    """The example app; its runs nap ``nap_seconds`` per unit of snooze."""

    async def index(request: Request) -> Response:
        return HTMLResponse(PAGE.format(root=request.scope.get("root_path", "")))

    async def start(request: Request) -> Response:
        if request.headers.get("x-packmule") != "1":  # as the dashboard does: no cross-site forms
            return JSONResponse({"error": "send the header X-PackMule: 1"}, 403)
        runner = SleepyRunner(f"web-page-{uuid.uuid4().hex[:8]}", record_return_values=True)
        runner.nap_seconds = nap_seconds
        await run_in_threadpool(runner.run_async, NAPS)  # queues the run; it goes on in the workers
        return JSONResponse({"name": runner.name})

    return Starlette(routes=[Route("/", index), Route("/start", start, methods=["POST"]),
                             Mount("/packmule", app=packmule.web.create_app())])


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--nap-seconds", type=float, default=0.2)
    a = ap.parse_args()
    print(f"the example page: http://127.0.0.1:{a.port}/", flush=True)
    uvicorn.run(make_app(a.nap_seconds), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
