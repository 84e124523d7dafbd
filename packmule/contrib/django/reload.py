"""``manage.py packmule_worker --reload``: run the worker in a child process and
start it again when a ``.py`` file of the project changes (mtime polling, once
a second; no dependency).  The old worker drains first (SIGTERM), as on a deploy."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["POLL_EVERY", "run", "snapshot"]

log = logging.getLogger("packmule.worker")

POLL_EVERY = 1.0  # s between two looks at the files' mtimes
STOP_GRACE = 10.0  # s the old worker may drain before it is killed
SKIP = {"__pycache__", "node_modules", "site-packages", "venv", ".venv", ".git", ".tox"}


def snapshot(roots: Sequence[Path]) -> dict[str, float]:
    """path -> mtime of every ``.py`` file under ``roots`` (hidden and build folders left out)."""
    found: dict[str, float] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    try:
                        found[path] = os.stat(path).st_mtime
                    except OSError:
                        continue
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(command: list[str], roots: Sequence[Path], poll_every: float = POLL_EVERY) -> int:
    """Run ``command``, restarted on each change under ``roots`` (a worker that
    exited, say on an error being fixed, too), until SIGTERM or SIGINT, passed on
    as a drain; 0 then."""
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stopping.append(signum))
    seen = snapshot(roots)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    log.info("--reload: watching %d files under %s", len(seen), ", ".join(map(str, roots)))
    while not stopping:
        time.sleep(poll_every)
        now = snapshot(roots)
        if now == seen:
            continue
        changed = sorted(set(now.items()) ^ set(seen.items()))
        seen = now
        log.info("--reload: %s changed: restarting the worker", changed[0][0])
        _stop(proc)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    _stop(proc)
    return 0
