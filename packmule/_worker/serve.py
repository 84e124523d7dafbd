"""The loop every worker process runs, whatever the backend: reserve a batch,
run it, commit it; the batch grows while jobs are quick and shrinks when slow."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time

from packmule._core import config as _config
from packmule._core.errors import BackendUnavailable
from packmule._model.job import HOOKS
from packmule._model.registry import Beat
from packmule._worker.engine import Engine
from packmule.backends.base import Backend

__all__ = ["FAILED_BATCH_DELAY", "MAX_BATCH", "QUICK", "SLOW", "serve"]

log = logging.getLogger("packmule")

MAX_BATCH = 32
FAILED_BATCH_DELAY = 5.0  # s before the items of a batch that failed outside its jobs are tried again
QUICK, SLOW = 0.01, 0.05  # s a batch may take before it grows / shrinks


def serve(backend: Backend, stop: threading.Event, max_jobs: int | None = None,
          reserve_timeout: float = 0.5) -> int:
    """Serve the queue until ``stop`` is set (the running batch finishes first)
    or ``max_jobs`` jobs have run; returns how many ran."""
    # A batch keeps a few objects per job alive until it commits (tasks, outcomes,
    # records): with the default threshold (700) the collector walks them about
    # once per hundred jobs - a tenth of a worker's time - and finds nothing to
    # free.  Collect once per many thousand objects instead, and leave the
    # modules loaded so far (again once the first jobs have loaded their
    # runners' modules) out of full collections.
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
    engine = Engine(backend, _config.state_ttl())
    beat = Beat(backend).start()  # (the dashboard's view of this process and its totals)
    try:
        return _serve(backend, engine, stop, max_jobs, reserve_timeout)
    finally:
        beat.stop()
        for hook in HOOKS.at_exit:  # (a framework's: closing its connections, say)
            try:
                hook()
            except Exception:
                log.exception("a worker exit hook failed")


def _serve(backend: Backend, engine: Engine, stop: threading.Event, max_jobs: int | None,
           reserve_timeout: float) -> int:
    batch, ran, frozen = 1, 0, False
    while not stop.is_set() and (max_jobs is None or ran < max_jobs):
        items = backend.queue.reserve_many(batch, reserve_timeout)
        if not items:
            continue
        started = time.monotonic()
        try:
            ran += engine.run_batch(items)
        except BackendUnavailable:
            # a server failed under the batch: its items go back now (an acked one is
            # lapsed: ignored), not when their time-to-run ends; the caller waits a while
            for item in items:
                with contextlib.suppress(Exception):
                    backend.queue.release(item.handle, 1.0)
            raise
        except Exception:  # a bug of packmule's, not of a job: keep serving, the jobs come back
            log.exception("a batch of %d queue items failed outside its jobs; they go back to the queue "
                          "in %.0fs", len(items), FAILED_BATCH_DELAY)
            for item in items:
                with contextlib.suppress(Exception):  # (an acked one is lapsed: ignored)
                    backend.queue.release(item.handle, FAILED_BATCH_DELAY)
        took = time.monotonic() - started
        if not frozen and ran:
            gc.freeze()  # (the runners' modules, imported by the first jobs)
            frozen = True
        if took < QUICK:
            batch = min(batch * 2, MAX_BATCH)
        elif took > SLOW:
            batch = max(1, batch // 2)
    return ran
