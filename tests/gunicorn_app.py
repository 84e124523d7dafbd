"""A WSGI app for ``tests/test_gunicorn.py``, served by ``gunicorn --preload``.

Its module-level code runs once, in gunicorn's master process, before the
master forks its workers: it starts and waits on runs, so the backend (and its
connections, and on the local backend its coordinator and workers) exists
before the fork, as in an app that uses packmule at import; and it keeps a
Runner (``BOOTED``) that every worker reads.  Each request
(``/run?tag=T&width=W``) then starts a run of W jobs in the worker process that
serves it, waits for it, and answers with its value, its progress, a blocking
run's value, ``BOOTED``'s progress and the pid of the worker; ``/pid`` answers
at once.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from packmule.conformance.runners import Tree

WAIT = 30.0  # s a request's run may take
MASTER = os.getpid()
BOOT = Tree(None).root(2)  # (the master uses packmule before gunicorn forks)
assert BOOT == [["0.0", "0.1"], ["1.0", "1.1"]], BOOT
BOOTED = Tree(None)  # (made once the backend exists, and used by every worker)
BOOTED.enqueue("fan_of", ["boot"])
assert BOOTED.wait(timeout=WAIT) == "2.0 / 2.0"


def runs(tag: str, width: int) -> dict[str, Any]:
    tree = Tree(None)
    tree.enqueue("fan_of", [f"{tag}:{k}" for k in range(width)])
    progress = tree.wait(timeout=WAIT)
    return {"pid": os.getpid(), "master": MASTER, "progress": str(progress), "value": tree.get_return_value(),
            "sync": Tree(None).root(width), "booted": str(BOOTED.update_progress())}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    try:
        if environ["PATH_INFO"] == "/pid":
            status, answer = "200 OK", {"pid": os.getpid(), "master": MASTER}
        else:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            status, answer = "200 OK", runs(query["tag"][0], int(query["width"][0]))
    except Exception:
        status, answer = "500 Internal Server Error", {"pid": os.getpid(), "error": traceback.format_exc()}
    body = json.dumps(answer).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
