"""A local worker process: ``python -m packmule._worker.local_process``, started
by the local coordinator with its address and secret in the environment."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from packmule._core.hooks import SETUP_FAILED_EXIT, WorkerSetupFailed, setup_worker
from packmule._worker.serve import serve
from packmule.backends import local

__all__ = ["main"]


def main() -> int:
    logging.basicConfig(level=os.environ.get("PACKMULE_LOG_LEVEL", "WARNING"),
                        format=f"packmule worker {os.getpid()}: %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the running batch, then exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal goes to the coordinator
    try:
        setup_worker()  # (PACKMULE_WORKER_SETUP: a framework's, django.setup() say; before any job)
    except WorkerSetupFailed as exc:
        print(f"packmule local worker: {exc}", file=sys.stderr)
        return SETUP_FAILED_EXIT  # (its backend starts no other: each would fail alike)
    try:
        client = local.LocalClient(os.environ[local.ADDRESS_VAR], bytes.fromhex(os.environ[local.SECRET_VAR]),
                                   role="worker")
    except Exception as exc:
        print(f"packmule local worker: cannot reach the coordinator: {exc}", file=sys.stderr)
        return 1
    local._client = client  # jobs that build a Runner reach the backend through this same connection
    try:
        serve(client, stop)
    except local.BackendUnavailable:
        return 0  # the coordinator ended: so do we
    return 0


if __name__ == "__main__":
    sys.exit(main())
